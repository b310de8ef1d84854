"""Benchmark: whole-slide throughput end to end and model-only, stage breakdown, peak memory.

Writes a phantom slide (default 100k x 80k px at 0.25 um/px, cached under benchmarks/out/), then
analyses it in a fresh process with the tumor_wsi model: tiles/s end to end (open, tissue,
decode in worker processes overlapped with inference, postprocess), tiles/s of the model alone
on the same batch size, the stage timings, and peak RSS of the analysing process and of its
decode workers. Results go to benchmarks/out/wsi_throughput.json and .png.

    .venv/bin/python benchmarks/wsi_throughput.py [--width 100000 --height 80000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
MODEL = ROOT / "models" / "tumor_wsi"


def write(args: argparse.Namespace) -> Path:
    from phantoms.wsi_slide import write_wsi_slide

    folder = OUT / f"wsi_{args.width}x{args.height}_seed{args.seed}"
    done = folder / "done.json"
    if done.is_file():
        return folder
    t0 = time.perf_counter()
    paths = write_wsi_slide(folder, args.width, args.height, args.tumor, args.seed, workers=args.workers)
    done.write_text(json.dumps({"paths": [str(p) for p in paths], "write_s": time.perf_counter() - t0,
                                "bytes": sum(p.stat().st_size for p in paths)}))
    return folder


def analyse(args: argparse.Namespace) -> dict:
    """Runs in its own process so that peak RSS is the analysis alone."""
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.model_card import load_card
    from pipelines.wsi_analysis import analyse_wsi_slide
    from service.onnx_sessions import Predictor, build_session

    folder = OUT / f"wsi_{args.width}x{args.height}_seed{args.seed}"
    paths = json.loads((folder / "done.json").read_text())["paths"]
    card = load_card(MODEL)
    infer = Predictor(card, build_session(card, threads=args.threads))
    t = card.preprocessing.tile_size
    batch = np.random.default_rng(0).normal(size=(card.preprocessing.batch_size, 3, t, t)).astype(np.float32)
    infer(batch)
    t0 = time.perf_counter()
    for _ in range(args.model_repeats):
        infer(batch)
    model_tps = args.model_repeats * len(batch) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        result = analyse_wsi_slide(card, paths, infer, executor=pool)
    wall = time.perf_counter() - t0
    tiles = result.measurements.get("tiles_analysed", 0)
    return {
        "analysed": result.analysed,
        "reason": result.reason,
        "present": result.present,
        "score": result.score,
        "tiles_analysed": tiles,
        "grid": [result.heatmap["rows"], result.heatmap["cols"]] if result.heatmap else None,
        "tissue_fraction": result.measurements.get("tissue_fraction"),
        "end_to_end_s": round(wall, 2),
        "end_to_end_tiles_per_s": round(tiles / wall, 1) if wall else None,
        "model_only_tiles_per_s": round(model_tps, 1),
        "stages_s": result.timings,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {k: v for k, v in report["analysis"]["stages_s"].items() if k not in ("total", "tiles_stage")}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(list(stages), list(stages.values()), color="#7a4f9a")
    a.set_xlabel("seconds (decode is summed over workers; decode_wait is what the main process waited)")
    a.set_title(f"stages, {report['slide']}")
    rates = [report["analysis"]["end_to_end_tiles_per_s"], report["analysis"]["model_only_tiles_per_s"]]
    b.bar(["end to end", "model only"], rates, color=["#c06080", "#607fc0"])
    b.set_ylabel("tiles / s")
    b.set_title(f"peak RSS {report['analysis']['peak_rss_mb']:.0f} MB (+ workers "
                f"{report['analysis']['peak_rss_worker_mb']:.0f} MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--tumor", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-repeats", type=int, default=5)
    ap.add_argument("--stage", choices=["all", "write", "analyse"], default="all")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage == "write":
        write(args)
        return 0
    if args.stage == "analyse":
        print(json.dumps(analyse(args)))
        return 0
    folder = write(args)
    written = json.loads((folder / "done.json").read_text())
    base = [sys.executable, __file__, "--width", str(args.width), "--height", str(args.height),
            "--tumor", str(args.tumor), "--seed", str(args.seed), "--workers", str(args.workers),
            "--threads", str(args.threads), "--model-repeats", str(args.model_repeats)]
    run = subprocess.run([*base, "--stage", "analyse"], capture_output=True, text=True, check=True)
    analysis = json.loads(run.stdout.strip().splitlines()[-1])
    report = {
        "slide": f"{args.width}x{args.height} px, 0.25 um/px, tumor {args.tumor}, seed {args.seed}",
        "write_s": round(written["write_s"], 1),
        "slide_bytes": written["bytes"],
        "workers": args.workers,
        "ort_threads": args.threads,
        "analysis": analysis,
    }
    (OUT / "wsi_throughput.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "wsi_throughput.png")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
