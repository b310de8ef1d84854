"""The known truth of a phantom folder, kept beside its DICOM files as `phantom.json`.

`befund phantom` writes it; `befund model evaluate --data` reads it, so a folder of phantoms is
a labelled test set without a separate CSV. Folders written before the file existed are read
from the CT phantom's file names (`ct-<seed>-<finding>-<nnnn>.dcm`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TRUTH_FILE = "phantom.json"
_CT_NAME = re.compile(r"^ct-(\d+)-([a-z]+)-\d{4}\.dcm$")


def write_truth(folder: Path, kind: str, **facts: Any) -> Path:
    """`phantom.json` in `folder`: the kind, what was drawn and whether the finding is present."""
    if kind == "ct":
        present = facts.get("finding", "none") != "none"
    elif kind == "wsi":
        present = float(facts.get("tumor", 0.0)) > 0.0
    else:
        raise ValueError(f"unknown phantom kind {kind!r}")
    path = Path(folder) / TRUTH_FILE
    path.write_text(json.dumps({"kind": kind, "present": present, **facts}, indent=2) + "\n")
    return path


def read_truth(dicom_file: Path, stop_at: Path | None = None) -> dict[str, Any] | None:
    """The truth of the phantom `dicom_file` belongs to: the nearest `phantom.json` in its folder
    or above (not above `stop_at`), else its CT file name; None when neither says."""
    folder = dicom_file.parent
    while True:
        path = folder / TRUTH_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("present"), bool):
                finding = data.get("finding") or ("tumor" if data.get("present") else "none")
                return {"present": data["present"], "finding": str(finding)}
        if stop_at is None or folder == stop_at or folder == folder.parent or \
                not folder.is_relative_to(stop_at):
            break
        folder = folder.parent
    match = _CT_NAME.match(dicom_file.name)
    if match:
        return {"present": match.group(2) != "none", "finding": match.group(2)}
    return None
