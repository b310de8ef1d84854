"""Make a source's patient and study modules valid before befund's SR and SEG copy them.

highdicom copies the patient and study attributes of the first source header into the objects
befund writes. Real sources are not always valid themselves: a de-identified CT that says
PatientIdentityRemoved YES with an empty DeidentificationMethod (type 1C then) made our SR
fail dciodvfy, and de-identifiers often drop type 2 attributes (PatientBirthDate, PatientSex,
StudyID...) altogether, which made highdicom's Segmentation raise and the job fail. The copy
befund writes keeps what the source says and adds only what the standard requires: type 2
attributes present (empty when the source has none), a de-identification method with a text
that says where it comes from.
"""

from __future__ import annotations

import copy

import pydicom

METHOD_NOT_STATED = "not stated by the source (PatientIdentityRemoved YES)"
# Type 2 in the Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) modules: highdicom reads
# each of them from the source as an attribute
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def with_valid_patient_module(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds`, or a copy of it whose type 2 patient and study attributes are present and whose
    de-identification attributes satisfy PS3.3 C.7.1.1."""
    absent = [k for k in TYPE_2 if k not in ds]
    if absent:
        ds = copy.deepcopy(ds)  # copy.copy would share the element dict with the caller's
        for keyword in absent:
            setattr(ds, keyword, "")
    return _with_deidentification_method(ds)


def _with_deidentification_method(ds: pydicom.Dataset) -> pydicom.Dataset:
    removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper()
    method = str(ds.get("DeidentificationMethod", "") or "").strip()
    coded = bool(ds.get("DeidentificationMethodCodeSequence"))
    if removed == "YES" and not method and not coded:
        out = copy.deepcopy(ds)  # copy.copy would share the element dict with `ds`
        out.DeidentificationMethod = METHOD_NOT_STATED
        return out
    if removed != "YES" and "DeidentificationMethod" in ds and not method:
        out = copy.deepcopy(ds)  # copy.copy would share the element dict with `ds`
        del out.DeidentificationMethod  # an empty 1C attribute where it is not required
        return out
    return ds
