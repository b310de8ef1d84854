"""The labelled studies of `befund model evaluate --data DIR [--labels CSV]`.

Files are grouped by Study Instance UID, whatever the folder layout. Each study's label comes
from the CSV (columns `study_uid`, `label`, any others become subgroups), else from phantom
ground truth (phantoms/ground_truth.py). Subgroups read from the headers: slice thickness,
scanner (manufacturer and model), site (institution); plus the finding type where the truth
names it. Result objects (SR, SEG, ...) found under DIR are not studies' images and are left out.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from phantoms.ground_truth import read_truth
from service.dicom_sender import dicom_files

RESULT_MODALITIES = {"SR", "SEG", "KO", "PR"}
POSITIVE = {"1", "true", "yes", "present", "positive", "pos"}
NEGATIVE = {"0", "false", "no", "absent", "negative", "neg", "none"}
MAX_CSV_ROWS = 1_000_000
MAX_STUDIES = 100_000


@dataclass
class Study:
    uid: str
    files: list[Path] = field(default_factory=list)
    label: bool | None = None
    subgroups: dict[str, str] = field(default_factory=dict)


def _header_subgroups(ds: pydicom.Dataset) -> dict[str, str]:
    out = {}
    thickness = ds.get("SliceThickness")
    if thickness not in (None, ""):
        out["slice_thickness"] = f"{float(thickness):g} mm"
    scanner = " ".join(str(ds.get(k) or "").strip()
                       for k in ("Manufacturer", "ManufacturerModelName")).strip()
    if scanner:
        out["scanner"] = scanner
    site = str(ds.get("InstitutionName") or "").strip()
    if site:
        out["site"] = site
    return out


def collect_studies(data: Path) -> tuple[dict[str, Study], list[str]]:
    """Studies under `data` by UID, with header subgroups and phantom truth where present;
    and notes on what was left out."""
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"--data {data} is not a folder")
    studies: dict[str, Study] = {}
    notes: list[str] = []
    skipped = 0
    for path in dicom_files(data):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.StudyInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            skipped += 1
            continue
        if str(ds.get("Modality", "")).upper() in RESULT_MODALITIES:
            continue
        study = studies.get(uid)
        if study is None:
            if len(studies) >= MAX_STUDIES:
                raise ValueError(f"--data holds more than {MAX_STUDIES} studies; evaluate a part of it")
            study = studies[uid] = Study(uid, subgroups=_header_subgroups(ds))
            truth = read_truth(path, stop_at=data)
            if truth is not None:
                study.label = truth["present"]
                study.subgroups["finding"] = truth["finding"]
        study.files.append(path)
    if skipped:
        notes.append(f"{skipped} file(s) under {data} could not be read as DICOM and were left out")
    return studies, notes


def _label(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in POSITIVE:
        return True
    if value in NEGATIVE:
        return False
    raise ValueError(f"{where}: label {text!r} is neither positive ({', '.join(sorted(POSITIVE))}) "
                     f"nor negative ({', '.join(sorted(NEGATIVE))})")


def apply_labels(studies: dict[str, Study], csv_path: Path) -> list[str]:
    """Labels and subgroup columns from the CSV replace the phantom truth; notes on mismatches."""
    notes = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        uid_column = next((c for c in reader.fieldnames or [] if c.strip().lower() in
                           ("study_uid", "studyinstanceuid", "study_instance_uid")), None)
        label_column = next((c for c in reader.fieldnames or [] if c.strip().lower() == "label"), None)
        if uid_column is None or label_column is None:
            raise ValueError(f"{csv_path}: needs the columns study_uid and label (it has {columns})")
        for study in studies.values():
            study.label = None  # the CSV is the only source of labels when given
        unknown = 0
        for i, row in enumerate(reader, start=2):
            if i > MAX_CSV_ROWS:
                raise ValueError(f"{csv_path}: more than {MAX_CSV_ROWS} rows")
            uid = (row.get(uid_column) or "").strip()
            study = studies.get(uid)
            if study is None:
                unknown += 1
                continue
            study.label = _label(row.get(label_column) or "", f"{csv_path} line {i}")
            for key, value in row.items():
                if key not in (uid_column, label_column) and key and value not in (None, ""):
                    study.subgroups[key.strip()] = value.strip()
    if unknown:
        notes.append(f"{unknown} CSV row(s) name studies that are not under --data")
    return notes


def labelled(studies: dict[str, Study]) -> tuple[list[Study], list[str]]:
    """The studies that have a label, in UID order, and a note on those that have none."""
    have = [s for s in sorted(studies.values(), key=lambda s: s.uid) if s.label is not None]
    missing = len(studies) - len(have)
    return have, ([f"{missing} study(ies) without a label were left out"] if missing else [])


def subgroup_rows(studies: list[Study], key: str) -> dict[str, list[Study]]:
    out: dict[str, list[Study]] = {}
    for s in studies:
        if key in s.subgroups:
            out.setdefault(s.subgroups[key], []).append(s)
    return out


def subgroup_keys(studies: list[Study]) -> list[str]:
    preferred = ["finding", "slice_thickness", "scanner", "site"]
    seen = {k for s in studies for k in s.subgroups}
    return [k for k in preferred if k in seen] + sorted(seen - set(preferred))


def as_row(study: Study) -> dict[str, Any]:
    return {"study_uid": study.uid, "label": study.label, "instances": len(study.files), **study.subgroups}
