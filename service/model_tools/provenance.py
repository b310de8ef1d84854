"""Where a figure came from: the machine, the runtime and the exact model file.

A throughput or a sensitivity means little without the CPU it ran on, the onnxruntime
provider that ran it and the sha256 of the model it measured; every report carries these.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.model_card import ModelCard, sha256_of


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpus() -> list[str]:
    """Names of the NVIDIA GPUs `nvidia-smi` sees ([] when there is none or no driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(card: ModelCard | None = None, providers_used: list[str] | None = None) -> dict[str, Any]:
    """The facts every report carries; `providers_used` are the onnxruntime providers that ran."""
    import onnxruntime as ort

    out: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "befund_version": _version("befund"),
        "cpu_model": cpu_model(),
        "cpu_cores_usable": usable_cores(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpus": gpus(),
        "onnxruntime_version": ort.__version__,
        "onnxruntime_providers_available": ort.get_available_providers(),
        "onnxruntime_providers_used": providers_used or [],
        "python": platform.python_version(),
    }
    if card is not None:
        out["model"] = {"key": card.key, "task": card.task, "folder": str(card.folder.resolve()),
                        "file": card.file, "card_sha256": card.sha256,
                        "file_sha256": sha256_of(card.model_path) if card.model_path.is_file() else None}
    return out


def report_folder(out: str | None, command: str, model: str) -> Path:
    """`--out`, else model-reports/<command>-<model>-<UTC time>/ (created)."""
    folder = Path(out) if out else Path("model-reports") / \
        f"{command}-{model}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def needs_matplotlib():  # noqa: ANN201 - returns the pyplot module
    """pyplot on the Agg backend, or a clear error: plots are a development dependency."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("the PNG reports need matplotlib: .venv/bin/pip install -r "
                         "requirements-dev.lock (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
