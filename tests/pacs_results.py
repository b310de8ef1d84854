"""What a DCMTK storescp PACS holds: result SRs per study, counted by file, not only by UID.

Run storescp with `+uf` (unique file names): a result received twice then lies there twice,
so "exactly one" can be proven, not only "one distinct SOP Instance UID".
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

PACS_ARGS = ("--max-pdu", "131072", "+B", "+uf")


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
