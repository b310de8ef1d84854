"""What a DCMTK storescp PACS holds: result SRs per study, counted by file, not only by UID.

Run storescp with `+uf` (unique file names): a result received twice then lies there twice,
so "exactly one" can be proven, not only "one distinct SOP Instance UID".
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

PACS_ARGS = ("--max-pdu", "131072", "+B", "+uf")
ANY_OBJECT_ARGS = ("--max-pdu", "131072", "+B", "+xa", "-pm")  # all syntaxes, any SOP class


def results_for_study(directory: Path, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """Every complete object of `modality` (SR, SEG) the PACS holds for `study_uid`."""
    out = []
    for path in sorted(Path(directory).iterdir()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError, OSError, ValueError):
            continue  # storescp is still writing it; the next poll reads it whole
        if ds.get("StudyInstanceUID") == study_uid and ds.get("Modality") == modality:
            ds.filename = str(path)
            out.append(ds)
    return out


def sr_files(directory: Path, study_uid: str | None = None) -> list[tuple[Path, str, str]]:
    """(path, study UID, SOP Instance UID) of every SR file the PACS wrote (for `study_uid`)."""
    out = []
    for path in sorted(Path(directory).iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # storescp may still be writing it
        if ds.get("Modality") == "SR" and study_uid in (None, ds.StudyInstanceUID):
            out.append((path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))
    return out
