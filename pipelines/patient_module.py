"""Make a source's patient module valid before befund's SR and SEG copy it.

highdicom copies the patient module of the first source header into the objects befund
writes. Real sources are not always valid themselves: a de-identified CT that says
PatientIdentityRemoved YES with an empty DeidentificationMethod (type 1C then) made our SR
fail dciodvfy. The copy befund writes keeps what the source says and adds only what the
standard requires, with a text that says where it comes from.
"""

from __future__ import annotations

import copy

import pydicom

METHOD_NOT_STATED = "not stated by the source (PatientIdentityRemoved YES)"


def with_valid_patient_module(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds`, or a copy of it whose de-identification attributes satisfy PS3.3 C.7.1.1."""
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
