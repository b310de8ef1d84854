"""Write files so that a crash leaves either the old file, the new file, or nothing: never half."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync it, rename it, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def save_dataset_durably(ds: pydicom.Dataset, path: Path) -> Path:
    """Save a DICOM dataset as a Part 10 file with the same guarantees as `write_bytes_durably`."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_bytes_durably(path, buf.getvalue())
