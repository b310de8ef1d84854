"""Benchmark: what a shadow model costs the delivered results, and what the shadow report costs.

Part 1, side by side in one run: the real node with ich_ct alone, then with ich_ct and a
shadow copy of it (0.2.0). Each receives the same burst of head CTs (sent back to back by
storescu); per study, the time from series complete to the active SR accepted by a DCMTK
storescp PACS, and when the last shadow job finished. Shadow jobs queue behind every active
job (service/routing.py), so the active results should come about as fast as without shadow;
what they still share is the CPU (a shadow job already running when a study completes).

Part 2: `shadow_report` on an SQLite state DB holding N series, each with an active and a
shadow job (built with plain INSERTs), timed at several N.

    .venv/bin/python benchmarks/shadow_cost.py [--studies 5] [--slices 60] [--report-sizes 1000,10000,100000]

Writes benchmarks/out/shadow_cost.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from phantoms.ct_head import write_ct_series  # noqa: E402
from tests.dicom_peers import StoreSCP, run_storescu  # noqa: E402
from tests.node_harness import RunningNode, poll  # noqa: E402
from tests.pacs_results import ANY_OBJECT_ARGS  # noqa: E402

OUT = ROOT / "benchmarks" / "out"


def models_dir(root: Path, with_shadow: bool) -> Path:
    shutil.copytree(ROOT / "models" / "ich_ct", root / "ich_ct",
                    ignore=shutil.ignore_patterns("*.py", "*.png"))
    if with_shadow:
        shutil.copytree(root / "ich_ct", root / "ich_ct_next")
        card = yaml.safe_load((root / "ich_ct_next" / "card.yaml").read_text())
        card.update(version="0.2.0", mode="shadow", supersedes="0.1.0")
        (root / "ich_ct_next" / "card.yaml").write_text(yaml.safe_dump(card))
    return root


def burst(work: Path, with_shadow: bool, studies: list[list[Path]], uids: list[str]) -> dict:
    """One node, one burst; per study complete -> active SR delivered, and the shadow backlog."""
    label = "active_and_shadow" if with_shadow else "active_only"
    with StoreSCP(work / f"pacs-{label}", ae="PACS", extra_args=ANY_OBJECT_ARGS) as pacs, \
            RunningNode(work / f"node-{label}", pacs=f"PACS@127.0.0.1:{pacs.port}", settle_s=1.0,
                        job_workers=2,
                        models_dir=str(models_dir(work / f"models-{label}", with_shadow))) as node:
        warm = write_ct_series(work / f"warm-{label}", finding="none", slices=20, seed=7400 + with_shadow)
        assert run_storescu(warm, ae="BENCH", port=node.dicom_port, timeout=120).returncode == 0
        import pydicom

        warm_uid = pydicom.dcmread(warm[0], stop_before_pixels=True).StudyInstanceUID
        node.wait_study_state(warm_uid, {"delivered"}, timeout=120)
        for paths in studies:
            assert run_storescu(paths, ae="BENCH", port=node.dicom_port, timeout=300).returncode == 0
        jobs_each = 2 if with_shadow else 1
        for uid in uids:
            poll(lambda u=uid: (lambda s: s and s["state"] == "delivered" and len(s["jobs"]) == jobs_each
                                and all(j["state"] == "done" for j in s["jobs"]))(node.study(u)),
                 600, 0.1, f"study {uid} delivered and every job done")
        db = sqlite3.connect(node.var / "state.sqlite")
        db.row_factory = sqlite3.Row
        per_study, shadow_done = [], []
        for uid in uids:
            completed = db.execute("SELECT completed_at FROM series WHERE study_uid=?", (uid,)).fetchone()[0]
            active = db.execute("""SELECT o.delivered_at FROM outbox o JOIN jobs j ON j.id=o.job_id
                                   WHERE j.study_uid=? AND j.mode='active'""", (uid,)).fetchone()[0]
            per_study.append(round(active - completed, 3))
            row = db.execute("SELECT finished_at FROM jobs WHERE study_uid=? AND mode='shadow'",
                             (uid,)).fetchone()
            if row:
                shadow_done.append(round(row[0] - completed, 3))
        first = min(db.execute("SELECT completed_at FROM series WHERE study_uid=?", (u,)).fetchone()[0]
                    for u in uids)
        burst_end = db.execute("SELECT MAX(finished_at) FROM jobs").fetchone()[0]  # every job done
        db.close()
    return {"scenario": label, "complete_to_active_sr_s": per_study,
            "median_s": round(statistics.median(per_study), 3), "max_s": max(per_study),
            "complete_to_shadow_done_s": shadow_done,
            "burst_s": round(burst_end - first, 3)}


def report_timing(work: Path, sizes: list[int]) -> list[dict]:
    """shadow_report on N series with an active and a shadow job each (SQLite)."""
    from service.shadow_report import shadow_report
    from service.state_db import StateDB

    out = []
    for n in sizes:
        path = work / f"report-{n}.sqlite"
        db = StateDB(path)
        db.close()
        raw = sqlite3.connect(path)
        now = time.time()
        rows = []
        for k in range(n):
            series, study = f"1.2.826.0.7.{k}.1", f"1.2.826.0.7.{k}"
            a = (k % 10) < 3
            s = (k % 10) < 3 if k % 25 else not a  # 4 % flips
            for version, mode, present in (("0.1.0", "active", a), ("0.2.0", "shadow", s)):
                rows.append((series, study, "ich_ct", version, 1, 20, 0, "done", 1, now - 60, now - 60,
                             now - 30, json.dumps({"present": present, "score": 0.9 if present else 0.1,
                                                   "threshold": 0.5}), mode, int(present),
                             0.9 if present else 0.1))
        raw.executemany(
            """INSERT INTO jobs(series_uid, study_uid, model_name, model_version, run, instance_count,
                   priority, state, series_revision, created_at, updated_at, finished_at, result, mode,
                   present, score) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""", rows)
        raw.commit()
        raw.close()
        db = StateDB(path)
        started = time.perf_counter()
        report = shadow_report(db, "ich_ct", now - 3600)
        elapsed = time.perf_counter() - started
        db.close()
        [pair] = report["pairs"]
        assert pair["series_seen_by_both"] == n
        out.append({"series": n, "report_s": round(elapsed, 3), "kappa": pair["kappa"],
                    "disagreements_total": pair["disagreements_total"],
                    "listed": len(pair["disagreements"])})
        print(f"shadow report over {n} series: {elapsed:.3f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=5)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--report-sizes", default="1000,10000,100000")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        import pydicom

        studies = [write_ct_series(work / f"s{i}", finding="subdural" if i % 2 else "none",
                                   slices=args.slices, seed=7410 + i) for i in range(args.studies)]
        uids = [pydicom.dcmread(p[0], stop_before_pixels=True).StudyInstanceUID for p in studies]
        scenarios = [burst(work, False, studies, uids), burst(work, True, studies, uids)]
        timings = report_timing(work, [int(v) for v in args.report_sizes.split(",") if v])
    base, shadow = scenarios
    report = {
        "benchmark": "shadow_cost", "studies": args.studies, "slices": args.slices,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "scenarios": scenarios,
        "ratio_median_active_sr_with_shadow": round(shadow["median_s"] / base["median_s"], 3),
        "ratio_max_active_sr_with_shadow": round(shadow["max_s"] / base["max_s"], 3),
        "shadow_report": timings,
    }
    (OUT / "shadow_cost.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "shadow_cost.png")
    print(json.dumps({k: report[k] for k in ("ratio_median_active_sr_with_shadow",
                                             "ratio_max_active_sr_with_shadow")}))
    for s in scenarios:
        print(s["scenario"], "median", s["median_s"], "max", s["max_s"], "per study",
              s["complete_to_active_sr_s"], "shadow done", s["complete_to_shadow_done_s"])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for s, colour in zip(report["scenarios"], ("tab:blue", "tab:orange"), strict=True):
        xs = range(1, len(s["complete_to_active_sr_s"]) + 1)
        left.plot(xs, s["complete_to_active_sr_s"], "o-", color=colour,
                  label=f"{s['scenario'].replace('_', ' ')}: active SR")
        if s["complete_to_shadow_done_s"]:
            left.plot(xs, s["complete_to_shadow_done_s"], "x--", color=colour, label="shadow job done")
    left.set_xlabel("study of the burst")
    left.set_ylabel("seconds after its series completed")
    left.set_title(f"{report['studies']} head CTs x {report['slices']} slices, sent back to back")
    left.legend(fontsize=8)
    sizes = [t["series"] for t in report["shadow_report"]]
    right.loglog(sizes, [t["report_s"] for t in report["shadow_report"]], "o-")
    right.set_xlabel("series with an active and a shadow job")
    right.set_ylabel("GET shadow-report (s, SQLite)")
    right.set_title("shadow report time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
