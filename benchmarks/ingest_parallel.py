"""Parallel ingest: 1, 2, 4 and 8 associations at once, befund vs DCMTK `storescp --fork`.

200 CT instances of ~512 KB in all, split into one series per association (distinct series),
sent by that many `TCP_NODELAY=1 storescu --max-pdu 131072` processes at once, to
  - befund with `receive_workers` = the cores (a real `befund serve --role receiver` on
    PostgreSQL from tests/pg_server.py: each instance fsynced, renamed and committed before
    its acknowledgement),
  - befund with `receive_workers: 1` (the same node, one receiving process: the baseline the
    processes are for), and
  - DCMTK `TCP_NODELAY=1 storescp --fork --max-pdu 131072 +B` (a process per association, no fsync),
in rounds that alternate the three, fresh instances each round. Aggregate MB/s = all bytes /
wall time from the first storescu's start to the last one's end (every instance acknowledged).

Goal on 2 cores: befund's aggregate at 4 associations >= 1.5x its own single-association figure.

Writes benchmarks/out/ingest_parallel.json and benchmarks/out/ingest_parallel.png.

    .venv/bin/python -m benchmarks.ingest_parallel [--instances 200] [--runs 2] [--levels 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import MAX_PDU, write_series  # noqa: E402
from tests.dicom_peers import StoreSCP, run_storescu  # noqa: E402
from tests.node_harness import RunningNode  # noqa: E402
from tests.pg_server import PgServer  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
GOAL_GAIN = 1.5  # befund at 4 associations / befund at 1, same run


def send_parallel(groups: list[list[Path]], port: int, called_ae: str) -> float:
    """Every group in its own association at once; seconds until the last one is acknowledged."""
    results: list = [None] * len(groups)

    def send(i: int) -> None:
        results[i] = run_storescu(groups[i], ae="BENCH", port=port, called_ae=called_ae,
                                  extra_args=["--max-pdu", str(MAX_PDU)], timeout=600)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(groups))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    failed = [r.output[-1000:] for r in results if r is None or r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0]}")
    return seconds


def receiver_node(work: Path, url: str, processes: int) -> RunningNode:
    return RunningNode(work, database_url=url, role="receiver", receive_workers=processes,
                       instance_id=f"bench{processes}", spool_dir=str(work / "spool"),
                       results_dir=str(work / "results"), max_pdu=MAX_PDU,
                       min_free_bytes=256 * 1024**2, max_associations=32)


def indexed(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM instances").fetchone()[0]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("befund", f"befund, {result['receive_workers']} receiver processes"),
                       ("befund_one_process", "befund, 1 receiver process"),
                       ("storescp", "DCMTK storescp --fork (no fsync)")):
        ax.plot(levels, [result[key][str(n)]["median_mb_s"] for n in levels], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("parallel associations")
    ax.set_ylabel("aggregate MB/s (median)")
    ax.set_title(f"Parallel ingest, {result['instances']} x {result['mb_per_instance']:.2f} MB, "
                 f"{result['cpus']} cores; befund 4 vs 1: {result['gain_4_vs_1']:.2f}x", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--receive-workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, dict[int, list[float]]] = {k: {n: [] for n in levels}
                                                 for k in ("befund", "befund_one_process", "storescp")}
    total = 0
    with tempfile.TemporaryDirectory(prefix="befund-ingest-par-") as tmp, PgServer() as pg:
        work = Path(tmp)
        urls = {"befund": pg.new_database("bench"), "befund_one_process": pg.new_database("bench")}
        nodes = {"befund": receiver_node(work / "multi", urls["befund"], args.receive_workers),
                 "befund_one_process": receiver_node(work / "single", urls["befund_one_process"], 1)}
        for node in nodes.values():
            node.start(timeout=120)
        sent = 0
        try:
            fork = ["--fork", "--max-pdu", str(MAX_PDU), "+B"]
            with StoreSCP(work / "storescp-out", extra_args=fork) as scp:
                for run in range(args.runs):
                    for n in levels:
                        data = work / "data"
                        shutil.rmtree(data, ignore_errors=True)
                        for k in range(n):
                            (data / f"s{k}").mkdir(parents=True)
                        groups = [write_series(data / f"s{k}", args.instances // n) for k in range(n)]
                        files = [f for g in groups for f in g]
                        total = sum(f.stat().st_size for f in files)
                        order = ["storescp", "befund", "befund_one_process"]
                        order = order[run % 3:] + order[:run % 3]  # each goes first in some round
                        for key in order:
                            if key == "storescp":
                                seconds[key][n].append(send_parallel(groups, scp.port, scp.ae))
                            else:
                                seconds[key][n].append(send_parallel(groups, nodes[key].dicom_port, "BEFUND"))
                        sent += len(files)
                        shutil.rmtree(work / "storescp-out", ignore_errors=True)
                        (work / "storescp-out").mkdir()
                        print(f"run {run + 1}, {n} association(s): " + ", ".join(
                            f"{k} {total / seconds[k][n][-1] / 1e6:.0f} MB/s" for k in order), flush=True)
            for key, url in urls.items():
                if indexed(url) != sent:
                    raise RuntimeError(f"{key} indexed {indexed(url)} of {sent} instances")
        finally:
            for node in nodes.values():
                node.stop()
    result: dict = {
        "instances": args.instances, "bytes": total, "mb_per_instance": total / args.instances / 1e6,
        "levels": levels, "runs": args.runs, "cpus": os.cpu_count(), "receive_workers": args.receive_workers,
        "python": platform.python_version(), "max_pdu": MAX_PDU,
        "sender": "one TCP_NODELAY=1 storescu -R --max-pdu 131072 per association, all at once",
        "befund_setup": "befund serve --role receiver, PostgreSQL, fsync + rename + commit per instance",
    }
    for key, by_level in seconds.items():
        result[key] = {str(n): {"seconds": s, "best_mb_s": total / min(s) / 1e6,
                                "median_mb_s": total / statistics.median(s) / 1e6}
                       for n, s in by_level.items()}
    med = {k: {n: result[k][str(n)]["median_mb_s"] for n in levels} for k in seconds}
    result["ratio_to_storescp"] = {str(n): med["befund"][n] / med["storescp"][n] for n in levels}
    if 1 in levels and 4 in levels:
        result["gain_4_vs_1"] = med["befund"][4] / med["befund"][1]
        result["gain_4_vs_1_one_process"] = med["befund_one_process"][4] / med["befund_one_process"][1]
        result["goal_met"] = result["gain_4_vs_1"] >= GOAL_GAIN
    else:
        result["gain_4_vs_1"] = float("nan")
    result["load_average"] = os.getloadavg()
    (OUT / "ingest_parallel.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "ingest_parallel.png")
    for n in levels:
        print(f"{n} association(s): " + ", ".join(f"{k} {med[k][n]:.0f} MB/s" for k in seconds)
              + f"; befund/storescp {result['ratio_to_storescp'][str(n)]:.2f}x")
    print(f"befund 4 vs 1 association(s): {result['gain_4_vs_1']:.2f}x (goal {GOAL_GAIN}x: "
          f"{'met' if result.get('goal_met') else 'NOT met'}); one process: "
          f"{result.get('gain_4_vs_1_one_process', float('nan')):.2f}x")


if __name__ == "__main__":
    main()
