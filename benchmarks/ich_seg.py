"""Benchmark: CT hemorrhage segmentation (models/ich_seg), time to result and memory.

(a) Time: the real node and a DCMTK storescp as the PACS; a 300-slice subdural phantom sent
    with storescu; from "series complete" to the PACS accepting the ich_seg job's SR and SEG
    (one delivery holds both), with the stage breakdown. Goal <= 5 s on 2 cores. With
    `--with-ich-ct` the node runs ich_ct as well, on the same series, as a site would.
(b) Memory: a 1000-slice phantom through the task's analysis as the model service runs it
    (two spawned decode workers that window each chunk to uint8), then the SEG and SR built
    from the result as the gateway does, each in its own process, so that their peak RSS
    (ru_maxrss) is that work alone. Goal <= 1.5 GB. The card's validated domain is left out of
    (b) only: 1000 phantom slices over the phantom's 160 mm are 0.16 mm apart, which the
    domain (0.5-5 mm) refuses before decoding.

Writes benchmarks/out/ich_seg.json and ich_seg.png.

    .venv/bin/python benchmarks/ich_seg.py [--slices 300] [--runs 3] [--with-ich-ct] [--memory-slices 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phantoms.ct_head import write_ct_series  # noqa: E402
from tests.dicom_peers import StoreSCP, run_storescu  # noqa: E402
from tests.node_harness import RunningNode, descendants, poll  # noqa: E402
from tests.pacs_results import ANY_OBJECT_ARGS  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
MODELS = ROOT / "models"
GOAL_S = 5.0
GOAL_RSS_MB = 1536.0


def node_cpu_seconds(node: RunningNode) -> float:
    """CPU time (user + system, own and reaped children) of the node's processes so far."""
    total = 0
    for pid in [node.proc.pid, *descendants(node.proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def one_run(node: RunningNode, pacs: StoreSCP, work: Path, seed: int, slices: int) -> dict:
    import pydicom

    paths = write_ct_series(work / f"s{seed}", finding="subdural", slices=slices, seed=seed)
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    cpu_before, load_before = node_cpu_seconds(node), os.getloadavg()[0]
    sent = run_storescu(paths, ae="BENCH", port=node.dicom_port, timeout=300,
                        extra_args=("--max-pdu", "131072"))
    assert sent.returncode == 0, sent.output
    poll(lambda: node.study(study_uid) and node.study(study_uid)["state"] == "delivered", 300,
         0.05, "delivered")
    cpu = node_cpu_seconds(node) - cpu_before
    db = sqlite3.connect(node.var / "state.sqlite")
    db.row_factory = sqlite3.Row
    completed = db.execute("SELECT completed_at FROM series WHERE study_uid=?", (study_uid,)).fetchone()[0]
    # the node's CPU for the whole study (receive, analysis, encode, deliver): on a busy shared
    # machine the wall times above stretch, this does not
    out = {"slices": slices, "seed": seed, "node_cpu_s": round(cpu, 2), "load_average": round(load_before, 2)}
    for job in db.execute("SELECT * FROM jobs WHERE study_uid=?", (study_uid,)).fetchall():
        delivery = db.execute("SELECT * FROM outbox WHERE job_id=?", (job["id"],)).fetchone()
        result = json.loads(job["result"])
        stages = {k: round(v, 3) for k, v in result["timings"].items()}
        stages["queue_and_call"] = round(job["finished_at"] - completed - sum(result["timings"].values()), 3)
        stages["deliver"] = round(delivery["delivered_at"] - job["finished_at"], 3)
        out[job["model_name"]] = {
            "complete_to_delivered_s": round(delivery["delivered_at"] - completed, 3),
            "files": [Path(f).name for f in json.loads(delivery["payload"]).get("files", [])]
            if "payload" in delivery.keys() else None,
            "stages_s": stages, "present": result["present"],
            "volume_ml": result["measurements"].get("volume_ml"),
        }
    db.close()
    return out


def time_to_result(args, work: Path) -> dict:
    models = work / "models"
    models.mkdir()
    names = ["ich_seg", "ich_ct"] if args.with_ich_ct else ["ich_seg"]
    for name in names:
        (models / name).symlink_to(MODELS / name)
    with StoreSCP(work / "pacs", ae="PACS", extra_args=ANY_OBJECT_ARGS) as pacs, \
            RunningNode(work / "node", pacs=f"PACS@127.0.0.1:{pacs.port}", settle_s=2.0,
                        models_dir=str(models), job_workers=len(names)) as node:
        one_run(node, pacs, work, 7100, 24)  # warm-up: the first call pays imports
        runs = [one_run(node, pacs, work, 7101 + i, args.slices) for i in range(args.runs)]
    times = sorted(r["ich_seg"]["complete_to_delivered_s"] for r in runs)
    cpu = sorted(r["node_cpu_s"] for r in runs)
    return {"models": names, "runs": runs, "median_s": times[len(times) // 2], "best_s": times[0],
            "meets_goal": times[len(times) // 2] <= GOAL_S, "node_cpu_s_median": cpu[len(cpu) // 2]}


ANALYSE = """
import json, resource, sys, time, dataclasses
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from pathlib import Path
import onnxruntime as ort
from pipelines.model_card import load_card
from pipelines.tasks import task_of
card = dataclasses.replace(load_card(Path(sys.argv[1])), validated_domain=None)
paths = sorted(Path(sys.argv[2]).glob("*.dcm"))
opts = ort.SessionOptions(); opts.intra_op_num_threads = 2; opts.inter_op_num_threads = 1
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
infer = lambda x: session.run(None, {card.input.name: x})[0]
with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
    t = time.perf_counter()
    result = task_of(card).analyse(card, paths, infer, executor=ex)
    seconds = time.perf_counter() - t
assert result.analysed, result.reason
Path(sys.argv[3]).write_text(json.dumps(result.to_dict()))
print(json.dumps({"seconds": round(seconds, 2), "timings": result.timings,
                  "volume_ml": result.measurements["volume_ml"],
                  "slices_segmented": result.measurements["slices_segmented"],
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "peak_rss_worker_mb": round(
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}))
"""

ENCODE = """
import json, resource, sys, time
from pathlib import Path
import pydicom
from pipelines.findings import AnalysisResult
from pipelines.model_card import load_card
from pipelines.result_uids import result_uids
from pipelines.tasks import task_of
card = load_card(Path(sys.argv[1]))
result = AnalysisResult.from_dict(json.loads(Path(sys.argv[3]).read_text()))
task = task_of(card)
by_uid = {}
for p in sorted(Path(sys.argv[2]).glob("*.dcm")):
    h = pydicom.dcmread(p, stop_before_pixels=True)
    by_uid[h.SOPInstanceUID] = h
t = time.perf_counter()
headers = [by_uid[u] for u in dict.fromkeys(task.referenced_instances(result))]
uids = result_uids(headers[0].SeriesInstanceUID, card.key, 1)
sr = task.build_sr(card, result, headers, uids, 1, None)
seg = task.build_seg(card, result, headers, uids, 1)
seg.save_as(Path(sys.argv[3]).with_suffix(".seg.dcm"))
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "seg_frames": int(seg.NumberOfFrames),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def memory(args, work: Path) -> dict:
    folder = work / "m1000"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # written by another process: a child inherits its parent's peak RSS (ru_maxrss survives
    # fork and exec), and the 1000-slice phantom takes 1.2 GB while it is made
    subprocess.run([sys.executable, "-c", "import sys; from phantoms.ct_head import write_ct_series; "
                    "write_ct_series(sys.argv[1], 'subdural', int(sys.argv[2]), 7200)", str(folder),
                    str(args.memory_slices)], check=True, env=env, timeout=1200)
    result_path = work / "m1000-result.json"
    out = {}
    for name, code in (("analysis", ANALYSE), ("encode", ENCODE)):
        done = subprocess.run([sys.executable, "-c", code, str(MODELS / "ich_seg"), str(folder),
                               str(result_path)], capture_output=True, text=True, env=env, timeout=1200)
        if done.returncode:
            raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    peak = max(out["analysis"]["peak_rss_mb"], out["encode"]["peak_rss_mb"])
    return {"slices": args.memory_slices, **out, "peak_rss_mb": peak, "meets_goal": peak <= GOAL_RSS_MB}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--with-ich-ct", action="store_true")
    ap.add_argument("--memory-slices", type=int, default=1000)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="(b) alone, merged into the last JSON")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    name = "ich_seg_with_ich_ct" if args.with_ich_ct else "ich_seg"
    if args.memory_only:
        last = OUT / f"{name}.json"
        report = json.loads(last.read_text()) if last.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            report["memory"] = memory(args, Path(tmp))
        print("memory:", json.dumps(report["memory"]), flush=True)
        last.write_text(json.dumps(report, indent=2))
        if "time_to_result" in report:  # the plot needs (a)'s timings
            plot(report, OUT / f"{name}.png")
        return
    report = {"benchmark": "ich_seg", "goal_s": GOAL_S, "goal_rss_mb": GOAL_RSS_MB,
              "cpu_cores": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        report["time_to_result"] = time_to_result(args, Path(tmp))
        keys = ("median_s", "best_s", "meets_goal", "node_cpu_s_median")
        print("time to result:", json.dumps({k: report["time_to_result"][k] for k in keys}), flush=True)
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            report["memory"] = memory(args, Path(tmp))
        print("memory:", json.dumps(report["memory"]), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / f"{name}.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["time_to_result"]["runs"]
    stages = list(runs[0]["ich_seg"]["stages_s"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3 + 0.3 * len(runs)), width_ratios=(3, 1))
    for i, r in enumerate(runs):
        left = 0.0
        for j, s in enumerate(stages):
            w = max(0.0, r["ich_seg"]["stages_s"].get(s, 0.0))
            a.barh(i, w, left=left, color=plt.cm.tab10(j), label=s if i == 0 else None)
            left += w
    a.axvline(GOAL_S, color="red", linestyle="--", label=f"goal {GOAL_S:.0f} s")
    a.set_yticks(range(len(runs)), [f"run {i + 1} ({r['slices']} slices)" for i, r in enumerate(runs)])
    a.set_xlabel("seconds from series complete to SR + SEG accepted by the PACS")
    a.set_title(f"ich_seg ({' + '.join(report['time_to_result']['models'])} on the node)")
    a.legend(loc="lower right", fontsize=8)
    if "memory" in report:
        m = report["memory"]
        peaks = [m["analysis"]["peak_rss_mb"], m["analysis"]["peak_rss_worker_mb"],
                 m["encode"]["peak_rss_mb"]]
        b.bar(["analysis", "workers", "SEG+SR"], peaks, color=["C0", "C1", "C2"])
        b.axhline(GOAL_RSS_MB, color="red", linestyle="--")
        b.set_ylabel("peak RSS (MB)")
        b.set_title(f"{m['slices']} slices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
