"""Load benchmark: N concurrent senders (DCMTK storescu processes) x M studies each.

Starts the real node and a DCMTK storescp as the PACS (`+uf`, so a duplicate would show as a
second file). Each sender sends its studies one association each, one after the other. Reports
throughput (studies/min from first association start to last SR delivered; ingest MB/s from
first association start to last association end) and p50/p99 time from a study's
association end to its SR accepted by the PACS. Writes benchmarks/out/load.json and load.png.

    .venv/bin/python benchmarks/load.py [--senders 8] [--studies 5] [--slices 16]

`--instances 1,2` compares, in one run, one befund instance with two on one PostgreSQL
(tests/pg_server.py) and one shared spool, the senders spread over the instances' DICOM
ports; the same studies go to each setup (own database, own PACS). Writes
benchmarks/out/load_instances.json and load_instances.png (studies/min, p50/p99 and the ratio).

`tests/test_load.py` runs the same driver and asserts that nothing is lost or doubled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from phantoms.ct_head import write_ct_series  # noqa: E402
from tests.dicom_peers import StoreSCP, run_storescu  # noqa: E402
from tests.node_harness import RunningNode, poll  # noqa: E402
from tests.pacs_results import PACS_ARGS, sr_files  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
FINDINGS = ("subdural", "none")


@dataclass
class Study:
    index: int
    finding: str
    study_uid: str
    paths: list[Path]
    nbytes: int
    sent_at: float = 0.0
    association_end: float = 0.0
    returncode: int | None = None
    output: str = ""
    result: dict = field(default_factory=dict)


def make_studies(work: Path, count: int, slices: int, seed: int = 9700) -> list[Study]:
    """One phantom per finding (the slow part), copied with fresh UIDs into `count` studies."""
    bases = {f: write_ct_series(work / "base" / f, finding=f, slices=slices, seed=seed + k)
             for k, f in enumerate(FINDINGS)}
    templates = {f: [pydicom.dcmread(p) for p in paths] for f, paths in bases.items()}
    studies = []
    for i in range(count):
        finding = FINDINGS[i % len(FINDINGS)]
        study_uid = generate_uid(entropy_srcs=[f"load-study-{seed}-{i}"])
        series_uid = generate_uid(entropy_srcs=[f"load-series-{seed}-{i}"])
        folder = work / f"study-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for j, ds in enumerate(templates[finding]):
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"load-sop-{seed}-{i}-{j}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AccessionNumber = f"LOAD{i:04d}"
            path = folder / f"{j:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies.append(Study(i, finding, study_uid, paths, sum(p.stat().st_size for p in paths)))
    return studies


def send_all(node: RunningNode | list[RunningNode], studies: list[Study], senders: int) -> None:
    """`senders` threads, each running storescu for its share of studies, one after another;
    with several nodes, sender k sends to node k mod n."""
    nodes = node if isinstance(node, list) else [node]

    def sender(k: int) -> None:
        for study in studies[k::senders]:
            study.sent_at = time.time()
            res = run_storescu(study.paths, ae=f"LOAD{k}", port=nodes[k % len(nodes)].dicom_port,
                               timeout=300)
            study.association_end = time.time()
            study.returncode, study.output = res.returncode, res.output[-2000:]

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_all_final(node: RunningNode, studies: list[Study], timeout: float) -> None:
    wanted = {s.study_uid for s in studies}
    final = {"delivered", "not analysed", "delivery failed"}

    def done():
        status, body = node.api("/studies")
        if status != 200:
            return False
        rows = {r["study_uid"]: r for r in body["studies"] if r["study_uid"] in wanted}
        return len(rows) == len(wanted) and all(r["state"] in final for r in rows.values())

    poll(done, timeout, 0.5, f"{len(wanted)} studies analysed and delivered")
    for study in studies:
        study.result = node.study(study.study_uid) or {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def delivered_at(study: Study) -> float | None:
    dicom = [d for d in study.result.get("deliveries", []) if d["kind"] == "dicom"]
    return dicom[0]["delivered_at"] if dicom and dicom[0]["state"] == "delivered" else None


def summarise(studies: list[Study], pacs_dir: Path, senders: int, slices: int) -> dict:
    first = min(s.sent_at for s in studies)
    last_end = max(s.association_end for s in studies)
    delivered = [delivered_at(s) for s in studies]
    ttr = [d - s.association_end for s, d in zip(studies, delivered, strict=True) if d]
    last_delivered = max((d for d in delivered if d), default=last_end)
    total_bytes = sum(s.nbytes for s in studies)
    srs = sr_files(pacs_dir)
    return {
        "senders": senders, "studies": len(studies), "slices_per_study": slices,
        "cpu_count": os.cpu_count(),
        "total_mb": round(total_bytes / 1e6, 1),
        "send_seconds": round(last_end - first, 2),
        "wall_seconds": round(last_delivered - first, 2),
        "ingest_mb_per_s": round(total_bytes / 1e6 / (last_end - first), 1),
        "studies_per_min": round(len(studies) / (last_delivered - first) * 60, 1),
        "delivered": sum(1 for d in delivered if d),
        "sr_files_at_pacs": len(srs),
        "time_to_result_s": {
            "p50": round(statistics.median(ttr), 2) if ttr else None,
            "p99": round(percentile(ttr, 99), 2) if ttr else None,
            "max": round(max(ttr), 2) if ttr else None,
        },
        "per_study": [
            {"index": s.index, "finding": s.finding, "state": s.result.get("state"),
             "present": s.result.get("present"), "sent_at": round(s.sent_at - first, 3),
             "association_end": round(s.association_end - first, 3),
             "delivered": round(d - first, 3) if d else None}
            for s, d in zip(studies, delivered, strict=True)],
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["per_study"] if r["delivered"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(sorted(rows, key=lambda r: r["sent_at"])):
        ax1.plot([r["sent_at"], r["association_end"]], [i, i], color="tab:blue", lw=2)
        ax1.plot([r["association_end"], r["delivered"]], [i, i], color="tab:orange", lw=2)
    ax1.set_xlabel("seconds since the first association")
    ax1.set_ylabel("study")
    ax1.set_title("receive (blue), then analyse + deliver (orange)")
    ttr = sorted(r["delivered"] - r["association_end"] for r in rows)
    ax2.plot(ttr, [(i + 1) / len(ttr) for i in range(len(ttr))], drawstyle="steps-post")
    t = summary["time_to_result_s"]
    ax2.set_xlabel("association end -> SR delivered (s)")
    ax2.set_ylabel("fraction of studies")
    ax2.set_title(f"p50 {t['p50']} s, p99 {t['p99']} s")
    fig.suptitle(f"{summary['senders']} senders x {summary['studies'] // summary['senders']} "
                 f"studies x {summary['slices_per_study']} slices: "
                 f"{summary['studies_per_min']} studies/min, ingest {summary['ingest_mb_per_s']} MB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_instances(counts: list[int], args: argparse.Namespace) -> dict:
    """The same studies through 1, 2, ... instances on one PostgreSQL and one shared spool each."""
    from tests.pg_server import PgServer

    result: dict = {"instances": counts, "senders": args.senders, "studies": args.senders * args.studies,
                    "slices_per_study": args.slices, "job_workers_per_instance": args.job_workers,
                    "cpu_count": os.cpu_count(), "state_db": "PostgreSQL (tests/pg_server.py)"}
    with tempfile.TemporaryDirectory(prefix="befund-load-") as tmp, PgServer() as pg:
        work = Path(tmp)
        for n in counts:
            studies = make_studies(work / "studies", args.senders * args.studies, args.slices)
            url = pg.new_database("load")
            shared = work / f"shared{n}"
            with StoreSCP(work / f"pacs{n}", ae="PACS", extra_args=PACS_ARGS) as pacs:
                nodes = [RunningNode(work / f"node{n}-{i}", pacs=f"PACS@127.0.0.1:{pacs.port}",
                                     job_workers=args.job_workers, database_url=url,
                                     instance_id=f"load{n}-{i}", spool_dir=str(shared / "spool"),
                                     results_dir=str(shared / "results")) for i in range(n)]
                try:
                    for node in nodes:
                        node.start(timeout=180)
                    send_all(nodes, studies, args.senders)
                    wait_all_final(nodes[0], studies, timeout=900)
                    summary = summarise(studies, pacs.directory, args.senders, args.slices)
                finally:
                    for node in nodes:
                        node.stop()
            result[str(n)] = summary
            print(f"{n} instance(s): {summary['studies_per_min']} studies/min, time to result p50 "
                  f"{summary['time_to_result_s']['p50']} s, p99 {summary['time_to_result_s']['p99']} s, "
                  f"{summary['delivered']}/{summary['studies']} delivered, {summary['sr_files_at_pacs']} SRs",
                  flush=True)
    if len(counts) > 1:
        first, last = result[str(counts[0])], result[str(counts[-1])]
        result["ratio_studies_per_min"] = round(last["studies_per_min"] / first["studies_per_min"], 2)
    return result


def plot_instances(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = result["instances"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar([str(n) for n in counts], [result[str(n)]["studies_per_min"] for n in counts])
    ax1.set_xlabel("befund instances (one PostgreSQL, one spool)")
    ax1.set_ylabel("studies/min")
    for key, label in (("p50", "p50"), ("p99", "p99")):
        ax2.plot([str(n) for n in counts], [result[str(n)]["time_to_result_s"][key] for n in counts],
                 marker="o", label=label)
    ax2.set_ylabel("association end -> SR delivered (s)")
    ax2.legend()
    fig.suptitle(f"{result['senders']} senders x {result['studies'] // result['senders']} studies, "
                 f"{result['cpu_count']} cores; ratio {result.get('ratio_studies_per_min', '-')}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--studies", type=int, default=5, help="studies per sender")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--job-workers", type=int, default=2)
    ap.add_argument("--instances", help="e.g. 1,2: instances on one PostgreSQL, compared in one run")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.instances:
        result = run_instances([int(n) for n in args.instances.split(",")], args)
        (OUT / "load_instances.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_instances(result, OUT / "load_instances.png")
        print(f"studies/min ratio: {result.get('ratio_studies_per_min')}")
        return
    with tempfile.TemporaryDirectory(prefix="befund-load-") as tmp:
        work = Path(tmp)
        studies = make_studies(work / "studies", args.senders * args.studies, args.slices)
        with StoreSCP(work / "pacs", ae="PACS", extra_args=PACS_ARGS) as pacs, \
                RunningNode(work / "node", pacs=f"PACS@127.0.0.1:{pacs.port}",
                            job_workers=args.job_workers) as node:
            send_all(node, studies, args.senders)
            wait_all_final(node, studies, timeout=900)
            summary = summarise(studies, pacs.directory, args.senders, args.slices)
    (OUT / "load.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, OUT / "load.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_study"}, indent=2))


if __name__ == "__main__":
    main()
