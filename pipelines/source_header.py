"""A reduced copy of a source header, for a "not analysed" SR when the full header breaks the encoder.

Headers from the wild carry values the SR encoder refuses (highdicom raises on a Patient's Sex
of "Q", a birth date of "19xx" or a study time of "99"). The SR that says "not analysed" must
still reach the PACS, so it is built from this copy: the identity the PACS files the SR by
(UIDs, Patient ID and Name, Issuer, Accession Number) kept as it is, and the descriptive
patient and study attributes kept only when they are valid for their VR; the rest is left
empty, which the SR's type 2 attributes allow.
"""

from __future__ import annotations

import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM, validate_value

IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
            "PatientID", "PatientName", "IssuerOfPatientID", "AccessionNumber")
DESCRIPTIVE = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "ReferringPhysicianName", "StudyDescription")
ENUMERATED = {"PatientSex": {"M", "F", "O"}}  # PS3.3 C.7.1.1
_PARSED = {"DA": DA, "DT": DT, "TM": TM}


def minimal_source_header(header: pydicom.Dataset) -> Dataset:
    """The identity of `header` and those of its descriptive attributes that are valid."""
    out = Dataset()
    for keyword in IDENTITY:
        if keyword in header:
            out[keyword] = header[keyword]
    for keyword in DESCRIPTIVE:
        if keyword in header and _valid(keyword, header[keyword]):
            out[keyword] = header[keyword]
    return out


def _valid(keyword: str, element: pydicom.DataElement) -> bool:
    value = element.value
    if value in (None, ""):
        return True
    try:
        validate_value(element.VR, value, config.RAISE)
        if element.VR in _PARSED:
            _PARSED[element.VR](value)
    except (ValueError, TypeError):
        return False
    return keyword not in ENUMERATED or str(value) in ENUMERATED[keyword]
