"""Benchmark: what a shadow model costs the delivered results, and what the shadow report costs.

Part 1, side by side in one run: two real nodes, one with ich_ct alone, one with ich_ct and a
shadow copy of it (0.2.0). Round after round, in alternating order, each receives the same
burst of head CTs (sent back to back by storescu) while the other idles; per study, the time
from series complete to the active SR accepted by a DCMTK storescp PACS, and when its shadow
job finished. Shadow jobs
run in the node's idle time (service/state/db.py `lease_job`), so what they still cost the
active results is a shadow job already running when a study completes.

Part 2: `shadow_report` on an SQLite state DB holding N series, each with an active and a
shadow job (built with plain INSERTs), timed at several N.

    .venv/bin/python benchmarks/shadow_cost.py [--studies 4] [--rounds 4] [--slices 60]
        [--report-sizes 1000,10000,100000]

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
from contextlib import ExitStack
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


class Scenario:
    """One running node (ich_ct alone, or with a shadow copy) and its PACS."""

    def __init__(self, stack: ExitStack, work: Path, with_shadow: bool) -> None:
        self.label = "active_and_shadow" if with_shadow else "active_only"
        self.with_shadow = with_shadow
        pacs = stack.enter_context(StoreSCP(work / f"pacs-{self.label}", ae="PACS",
                                            extra_args=ANY_OBJECT_ARGS))
        self.node = stack.enter_context(RunningNode(
            work / f"node-{self.label}", pacs=f"PACS@127.0.0.1:{pacs.port}", settle_s=1.0,
            job_workers=2, models_dir=str(models_dir(work / f"models-{self.label}", with_shadow))))

    def burst(self, studies: list[list[Path]], uids: list[str]) -> dict:
        """Send the studies back to back; per study complete -> active SR delivered."""
        node = self.node
        for paths in studies:
            assert run_storescu(paths, ae="BENCH", port=node.dicom_port, timeout=300).returncode == 0
        jobs_each = 2 if self.with_shadow else 1

        def finished(uid: str) -> bool:
            s = node.study(uid)
            return bool(s) and s["state"] == "delivered" and len(s["jobs"]) == jobs_each \
                and all(j["state"] == "done" for j in s["jobs"])

        for uid in uids:
            poll(lambda u=uid: finished(u), 600, 0.1, f"study {uid} delivered and every job done")
        db = sqlite3.connect(node.var / "state.sqlite")
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
        db.close()
        return {"scenario": self.label, "complete_to_active_sr_s": per_study,
                "median_s": round(statistics.median(per_study), 3), "max_s": max(per_study),
                "complete_to_shadow_done_s": shadow_done}


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
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--report-sizes", default="1000,10000,100000")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import pydicom

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with ExitStack() as stack:
            nodes = [Scenario(stack, work, False), Scenario(stack, work, True)]
            for k, scenario in enumerate(nodes):  # warm-up: the first call pays imports
                warm = write_ct_series(work / f"warm{k}", finding="none", slices=20, seed=7400)
                scenario.burst([warm], [pydicom.dcmread(warm[0], stop_before_pixels=True).StudyInstanceUID])
            rounds = []
            for r in range(args.rounds):  # both nodes on the same studies, round after round
                studies = [write_ct_series(work / f"r{r}s{i}", finding="subdural" if i % 2 else "none",
                                           slices=args.slices, seed=7410 + 10 * r + i)
                           for i in range(args.studies)]
                uids = [pydicom.dcmread(p[0], stop_before_pixels=True).StudyInstanceUID for p in studies]
                order = nodes if r % 2 == 0 else nodes[::-1]  # alternate: load drifts on a shared machine
                done = {sc.label: sc.burst(studies, uids) for sc in order}
                rounds.append([done["active_only"], done["active_and_shadow"]])
                print("round", r, [(b["scenario"], b["median_s"], b["max_s"], b["complete_to_shadow_done_s"])
                                   for b in rounds[-1]], flush=True)
        timings = report_timing(work, [int(v) for v in args.report_sizes.split(",") if v])
    ratios = [round(b["median_s"] / a["median_s"], 3) for a, b in rounds]
    report = {
        "benchmark": "shadow_cost", "studies": args.studies, "slices": args.slices,
        "cpu_cores": len(os.sched_getaffinity(0)), "rounds": rounds,
        "ratio_median_active_sr_with_shadow_per_round": ratios,
        "ratio_median_active_sr_with_shadow": statistics.median(ratios),
        "shadow_report": timings,
    }
    (OUT / "shadow_cost.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "shadow_cost.png")
    print(json.dumps({k: report[k] for k in ("ratio_median_active_sr_with_shadow_per_round",
                                             "ratio_median_active_sr_with_shadow")}))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"active_only": "tab:blue", "active_and_shadow": "tab:orange"}
    for r, pair in enumerate(report["rounds"]):
        for s in pair:
            n = len(s["complete_to_active_sr_s"])
            xs = [x + r * (n + 1) for x in range(1, n + 1)]
            left.plot(xs, s["complete_to_active_sr_s"], "o-", color=colours[s["scenario"]],
                      label=s["scenario"].replace("_", " ") + ": active SR" if r == 0 else None)
            if s["complete_to_shadow_done_s"]:
                left.plot(xs, s["complete_to_shadow_done_s"], "x--", color=colours[s["scenario"]],
                          label="its shadow job done" if r == 0 else None)
    left.set_xlabel("study of the burst (rounds side by side)")
    left.set_ylabel("seconds after its series completed")
    left.set_title(f"bursts of {report['studies']} head CTs x {report['slices']} slices")
    left.legend(fontsize=8)
    sizes = [t["series"] for t in report["shadow_report"]]
    right.loglog(sizes, [t["report_s"] for t in report["shadow_report"]], "o-")
    right.set_xlabel("series with an active and a shadow job")
    right.set_ylabel("shadow report (s, SQLite)")
    right.set_title("shadow report time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
