"""Ingest benchmark: befund's listener vs DCMTK storescp, the same series, the same sender.

Sends one 200-instance CT series (512x512, 16 bit, random noise, ~512 KB per instance) with
`TCP_NODELAY=1 storescu` in one association to
  - befund's DicomListener (in this process, temp spool, fsync + rename per instance) indexing
    through the node's own `StateDB.record_instance` (SQLite WAL, synchronous=NORMAL), and
  - DCMTK `TCP_NODELAY=1 storescp --max-pdu 131072 +B` writing to a temp dir (no fsync),
alternating runs, and reports MB/s of each (best of N and median) and the ratio.

Writes benchmarks/out/ingest.json and benchmarks/out/ingest.png.

    .venv/bin/python -m benchmarks.ingest [--instances 200] [--runs 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import Config  # noqa: E402
from service.dicom_listener import DicomListener  # noqa: E402
from service.spool import Spool, StoredInstance  # noqa: E402
from service.state_db import StateDB  # noqa: E402
from tests.dicom_peers import StoreSCP, run_storescu  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
MAX_PDU = 131072  # storescp's maximum; befund uses the same for a like-for-like comparison
GOAL_MB_S = 120.0
GOAL_RATIO = 0.5


def write_series(directory: Path, n: int, size: int = 512) -> list[Path]:
    """n CT slices of random noise, Explicit VR Little Endian."""
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Mark", "BENCH", "CT"
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
        path = directory / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Index:
    """The node's own index: `StateDB.record_instance` on the node's SQLite state DB (WAL,
    synchronous=NORMAL, see service/state_db.py for why that loses nothing acknowledged)."""

    def __init__(self, path: Path):
        self.db = StateDB(path)
        self.count = 0

    def on_instance(self, inst: StoredInstance) -> None:
        if self.db.record_instance(inst):
            self.count += 1

    def on_association_end(self, association_id: str, calling_ae: str) -> None:
        pass


def send(files: list[Path], port: int, called_ae: str) -> float:
    result = run_storescu(files, ae="BENCH", port=port, called_ae=called_ae,
                          extra_args=["--max-pdu", str(MAX_PDU)], timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.output[-2000:]}")
    return result.seconds


def run_befund(files: list[Path], work: Path, profile: bool = False, durable: bool = True) -> float:
    """One association into befund; `durable=False` (diagnostic only) skips every fsync."""
    if not durable:
        import service.spool as spool_module
        saved = spool_module._fsync_file, spool_module._fsync_dir
        spool_module._fsync_file = spool_module._fsync_dir = lambda path: None
        try:
            return _run_befund(files, work, profile)
        finally:
            spool_module._fsync_file, spool_module._fsync_dir = saved
    return _run_befund(files, work, profile)


def _run_befund(files: list[Path], work: Path, profile: bool) -> float:
    var = work / "befund-var"
    shutil.rmtree(var, ignore_errors=True)
    cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(var), max_pdu=MAX_PDU,
                 min_free_bytes=256 * 1024**2)
    spool = Spool(cfg.spool_path, cfg.min_free_bytes, max_instance_bytes=cfg.max_instance_bytes)
    index = Index(var / "state.sqlite")
    listener = DicomListener(cfg, spool, index.on_instance, index.on_association_end)
    listener.start()
    try:
        if profile:
            return _profiled_send(files, listener.port, work)
        seconds = send(files, listener.port, cfg.ae_title)
    finally:
        listener.stop()
    if index.count != len(files) or sum(1 for _ in spool.iter_instances()) != len(files):
        raise RuntimeError(f"befund indexed {index.count} of {len(files)} instances")
    return seconds


def _profiled_send(files: list[Path], port: int, work: Path) -> float:
    """Sample the listener (this process) with py-spy while storescu sends."""
    import subprocess
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = OUT / "ingest-profile.txt"
    proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "500",
                             "--output", str(out), "--threads", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let py-spy attach (profiling only)
    try:
        return send(files, port, "BEFUND")
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        proc.wait()


def run_storescp(files: list[Path], work: Path) -> float:
    target = work / "storescp-out"
    shutil.rmtree(target, ignore_errors=True)
    with StoreSCP(target) as scp:
        seconds = send(files, scp.port, scp.ae)
    if len(list(target.iterdir())) != len(files):
        raise RuntimeError("storescp did not store every instance")
    return seconds


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["befund", "befund_no_fsync", "storescp"]
    names = ["befund\n(fsync + durable index)", "befund, no fsync\n(diagnostic only)",
             "DCMTK storescp\n(no fsync)"]
    best = [result[k]["best_mb_s"] for k in keys]
    med = [result[k]["median_mb_s"] for k in keys]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, best, 0.4, label="best")
    ax.bar(x + 0.2, med, 0.4, label="median")
    ax.axhline(GOAL_MB_S, color="k", ls="--", lw=1, label=f"goal {GOAL_MB_S:.0f} MB/s")
    ax.set_xticks(x, names)
    ax.set_ylabel("MB/s")
    ax.set_title(f"Ingest, {result['instances']} x {result['mb_per_instance']:.2f} MB CT, one association; "
                 f"ratio {result['ratio_best']:.2f}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def phase_breakdown(files: list[Path], work: Path) -> dict[str, float]:
    """One more befund run with the spool's steps timed: ms per instance of each step.

    Whatever the steps do not cover is pynetdicom (PDUs, fragments into the incoming file,
    the response) and the sender.
    """
    import service.spool as spool_module

    spent: dict[str, float] = {}
    patched = [(spool_module, "_fsync_file", "fsync of the instance file"),
               (spool_module, "_fsync_dir", "fsync of its directory"),
               (Spool, "read_header", "header parse"),
               (StateDB, "record_instance", "index (SQLite)")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def timed(fn, label):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
        return run

    for owner, name, label in patched:
        setattr(owner, name, timed(getattr(owner, name), label))
    try:
        seconds = run_befund(files, work)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    per = {label: 1000 * v / len(files) for label, v in spent.items()}
    per["everything else (pynetdicom, sender)"] = 1000 * seconds / len(files) - sum(per.values())
    per["total"] = 1000 * seconds / len(files)
    return {k: round(v, 3) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="py-spy the befund side once, then exit")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="befund-ingest-") as tmp:
        work = Path(tmp)
        (work / "series").mkdir()
        files = write_series(work / "series", args.instances)
        total = sum(f.stat().st_size for f in files)
        if args.profile:
            run_befund(files, work, profile=True)
            print(f"profile written to {OUT / 'ingest-profile.txt'}")
            return
        send_s: dict[str, list[float]] = {"befund": [], "storescp": [], "befund_no_fsync": []}
        for _ in range(args.runs):  # alternate so all see the same background load
            send_s["storescp"].append(run_storescp(files, work))
            send_s["befund"].append(run_befund(files, work))
            send_s["befund_no_fsync"].append(run_befund(files, work, durable=False))
        phases = phase_breakdown(files, work)
    result = {
        "instances": len(files), "bytes": total, "mb_per_instance": total / len(files) / 1e6,
        "max_pdu": MAX_PDU, "runs": args.runs, "cpus": os.cpu_count(), "python": platform.python_version(),
        "sender": "TCP_NODELAY=1 storescu -R --max-pdu 131072 (one association)",
    }
    for name, secs in send_s.items():
        result[name] = {"seconds": secs, "best_mb_s": total / min(secs) / 1e6,
                        "median_mb_s": total / statistics.median(secs) / 1e6}
    result["ratio_best"] = result["befund"]["best_mb_s"] / result["storescp"]["best_mb_s"]
    result["ratio_median"] = result["befund"]["median_mb_s"] / result["storescp"]["median_mb_s"]
    result["ratio_no_fsync_best"] = result["befund_no_fsync"]["best_mb_s"] / result["storescp"]["best_mb_s"]
    result["befund_ms_per_instance_by_step"] = phases
    result["storescp_ms_per_instance"] = 1000 * min(send_s["storescp"]) / len(files)
    result["load_average"] = os.getloadavg()
    result["goal_met"] = result["befund"]["best_mb_s"] >= GOAL_MB_S and result["ratio_best"] >= GOAL_RATIO
    (OUT / "ingest.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "ingest.png")
    b, s = result["befund"], result["storescp"]
    print(f"{len(files)} instances, {total / 1e6:.1f} MB")
    print(f"befund:   best {b['best_mb_s']:.1f} MB/s, median {b['median_mb_s']:.1f} MB/s  {b['seconds']}")
    n = result["befund_no_fsync"]
    print(f"befund without fsync (diagnostic): best {n['best_mb_s']:.1f} MB/s, "
          f"median {n['median_mb_s']:.1f} MB/s")
    print(f"storescp: best {s['best_mb_s']:.1f} MB/s, median {s['median_mb_s']:.1f} MB/s  {s['seconds']}")
    print("befund, ms per instance by step: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"ratio befund/storescp: best {result['ratio_best']:.2f}x, median {result['ratio_median']:.2f}x; "
          f"goal (>= {GOAL_MB_S:.0f} MB/s and >= {GOAL_RATIO}x) {'met' if result['goal_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
