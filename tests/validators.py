"""Run the real validators on objects we write: dciodvfy (dicom3tools) and dsrdump (DCMTK)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The lines dciodvfy reports as errors (warnings are not errors)."""
    if shutil.which("dciodvfy") is None:
        raise RuntimeError("dciodvfy is not installed (Debian package dicom3tools)")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump_ok(path: Path | str) -> bool:
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0
