"""Benchmark: the same slide and the same tumor network through WSInfer and through befund, on CPU.

What it does, in one run:
1. the phantom slide (default 50k x 40k px at 0.25 um/px, cached under benchmarks/out/ like
   wsi_throughput.py) is read back level by level with pipelines.wsi_slide and written again as a
   tiled (256 px, JPEG q90) pyramidal BigTIFF with resolution tags, because WSInfer reads only
   TIFF/SVS;
2. models/tumor_wsi/model.onnx is rebuilt in torch and saved as TorchScript (no retraining:
   benchmarks/onnx_to_torchscript.py copies the ONNX weights), and its outputs are checked
   against onnxruntime on real tiles of the slide;
3. a WSInfer model config (spacing_um_px 0.5, patch_size_pixels 224, the card's class names and
   normalisation) is written and `wsinfer run -i SLIDES -o OUT -c config.json -p model.pt` runs;
4. befund's `analyse_wsi_slide` runs on the DICOM slide with a ProcessPoolExecutor of 2 decode
   workers and an onnxruntime session from service.onnx_sessions;
5. tiles/s of each and the ratio go to benchmarks/out/wsinfer_compare.json and .png.

WSInfer lives in its own venv, never in the product's (see ANCHORS.md, "Pathology"):

    python3 -m venv .wsinfer-venv
    .wsinfer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 wsinfer "zarr<3" \
        "tiffslide<3" openslide-python openslide-bin onnx
    mkdir -p ~/.wsinfer-zoo && echo '{"models": {}}' > ~/.wsinfer-zoo/wsinfer-zoo-registry.json
    .venv/bin/python benchmarks/wsinfer_compare.py [--width 50000 --height 40000] [--seed 4242]

HF_HUB_OFFLINE=1 is set for WSInfer by this script. If WSInfer cannot run, the JSON says why
(its exit status and the tail of its output) and a plain tifffile + onnxruntime loop over the
same TIFF (full-resolution read and resize, as WSInfer does) stands in as the peer; that loop
always runs too, as a second reference.
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
MODEL = ROOT / "models" / "tumor_wsi"
WSINFER_VENV = ROOT / ".wsinfer-venv"
TIFF_TILE = 256


def _decode_run(args: tuple) -> list[np.ndarray]:
    from pipelines.wsi_slide import decode_frame

    level, start, stop = args
    with open(level.path, "rb") as fp:
        return [decode_frame(level, i, fp)[:TIFF_TILE, :TIFF_TILE] for i in range(start, stop)]


def _level_tiles(level, pool: ProcessPoolExecutor):
    """The level's frames in row-major order (TILED_FULL frame order), decoded in processes."""
    step = 256
    runs = [(level, s, min(s + step, level.n_frames)) for s in range(0, level.n_frames, step)]
    for tiles in pool.map(_decode_run, runs):
        yield from tiles


def write_tiff(paths: list[str], tiff: Path, workers: int) -> dict:
    """DICOM pyramid -> tiled pyramidal BigTIFF, level by level, never whole in memory."""
    import tifffile

    from pipelines.wsi_slide import open_slide

    done = tiff.parent.parent / f"{tiff.stem}.json"  # WSInfer takes every file in its folder as a slide
    if done.is_file() and tiff.is_file():
        return json.loads(done.read_text())
    slide = open_slide(paths)
    t0 = time.perf_counter()
    tmp = tiff.parent.parent / f"{tiff.stem}.partial.tif"
    with ProcessPoolExecutor(workers) as pool, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, level in enumerate(slide.levels):
            if (level.tile_rows, level.tile_cols) != (TIFF_TILE, TIFF_TILE) or level.tiling != "TILED_FULL":
                raise ValueError(f"level {i}: expected TILED_FULL {TIFF_TILE}-px frames")
            res = 1e4 / level.spacing_um  # pixels per centimetre
            tif.write(_level_tiles(level, pool), shape=(level.rows, level.cols, 3), dtype=np.uint8,
                      tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 90}, resolution=(res, res), resolutionunit="CENTIMETER",
                      subfiletype=0 if i == 0 else 1, maxworkers=workers, metadata=None,
                      description=f"befund phantom; level {i}; {level.spacing_um} um/px")
    tmp.rename(tiff)
    info = {"tiff": str(tiff), "bytes": tiff.stat().st_size, "write_s": round(time.perf_counter() - t0, 1),
            "levels": [[lv.cols, lv.rows, lv.spacing_um] for lv in slide.levels]}
    done.write_text(json.dumps(info))
    return info


def sample_tiles(paths: list[str], card, n: int = 8) -> np.ndarray:
    """n normalised 224-px tiles from the middle of the slide at the model's spacing."""
    from pipelines.wsi_analysis import normalise
    from pipelines.wsi_slide import open_slide, read_region

    slide = open_slide(paths)
    level = slide.nearest_level(card.preprocessing.spacing_um)
    t = card.preprocessing.tile_size
    cy, cx = level.rows // 2, level.cols // 2
    tiles = np.stack([read_region(level, cx + (k - n // 2) * t, cy, t, t) for k in range(n)])
    return normalise(tiles, card.preprocessing)


def export_torchscript(card, paths: list[str], work: Path) -> dict:
    """ONNX -> TorchScript in the WSInfer venv; compare its logits with onnxruntime's."""
    import onnxruntime as ort

    x = sample_tiles(paths, card)
    np.save(work / "check_x.npy", x)
    pt = work / "model.pt"
    subprocess.run([str(WSINFER_VENV / "bin" / "python"), str(ROOT / "benchmarks" / "onnx_to_torchscript.py"),
                    str(card.model_path), str(pt), "--check-input", str(work / "check_x.npy"),
                    "--check-output", str(work / "check_y.npy")], check=True)
    ref = ort.InferenceSession(str(card.model_path), providers=["CPUExecutionProvider"]).run(
        None, {card.input.name: x})[0]
    got = np.load(work / "check_y.npy")
    diff = float(np.abs(ref - got).max())
    if diff > 1e-3:
        raise RuntimeError(f"TorchScript export differs from onnxruntime by {diff} (max |logit| diff)")
    return {"torchscript": str(pt), "max_abs_logit_diff_vs_onnxruntime": diff, "check_tiles": len(x)}


def wsinfer_config(card, path: Path) -> dict:
    pre = card.preprocessing
    config = {
        "spec_version": "1.0",
        "architecture": "befund tumor_wsi (TorchScript from model.onnx)",
        "num_classes": len(card.output.classes),
        "class_names": list(card.output.classes),
        "patch_size_pixels": pre.tile_size,
        "spacing_um_px": pre.spacing_um,
        "transform": [
            {"name": "Resize", "arguments": {"size": pre.tile_size}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(pre.mean), "std": list(pre.std)}},
        ],
    }
    path.write_text(json.dumps(config, indent=2))
    return config


def run_wsinfer(slides: Path, out: Path, config: Path, model: Path, workers: int, batch: int) -> dict:
    wsinfer = WSINFER_VENV / "bin" / "wsinfer"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not wsinfer.is_file():
        return {"ran": False, "error": f"{wsinfer} does not exist: install the venv (see docstring)"}
    t0 = time.perf_counter()
    subprocess.run([str(wsinfer), "--help"], env=env, capture_output=True)
    startup = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(wsinfer), "run", "-i", str(slides), "-o", str(out), "-c", str(config), "-p", str(model),
           "--num-workers", str(workers), "--batch-size", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = (proc.stdout + proc.stderr)[-3000:]
    csvs = sorted((out / "model-outputs-csv").glob("*.csv"))
    if proc.returncode != 0 or not csvs:
        return {"ran": False, "command": " ".join(cmd), "returncode": proc.returncode, "error": log}
    with open(csvs[0]) as f:
        rows = list(csv.DictReader(f))
    prob_key = next(k for k in rows[0] if k.startswith("prob_") and k.endswith("tumor"))
    probs = np.array([float(r[prob_key]) for r in rows])
    tiles = len(rows)
    return {"ran": True, "command": " ".join(cmd), "wall_s": round(wall, 2),
            "cli_startup_s": round(startup, 2),
            "tiles": tiles, "tiles_per_s_wall": round(tiles / wall, 1),
            "tiles_per_s_excl_startup": round(tiles / max(wall - startup, 1e-9), 1),
            "tumor_tiles_at_0.5": int((probs >= 0.5).sum()), "log_tail": log[-1500:]}


def run_befund(card, paths: list[str], workers: int, threads: int) -> dict:
    from pipelines.wsi_analysis import analyse_wsi_slide
    from service.onnx_sessions import Predictor, build_session

    infer = Predictor(card, build_session(card, threads=threads))
    t = card.preprocessing.tile_size
    infer(np.zeros((1, 3, t, t), np.float32))  # warm the session, as a running node has
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        result = analyse_wsi_slide(card, paths, infer, executor=pool)
    wall = time.perf_counter() - t0
    if not result.analysed:
        raise RuntimeError(f"befund did not analyse the slide: {result.reason}")
    tiles = int(result.measurements["tiles_analysed"])
    return {"wall_s": round(wall, 2), "tiles": tiles, "tiles_per_s": round(tiles / wall, 1),
            "present": result.present, "score": round(result.score, 4),
            "tumor_tiles_at_0.5": int(sum(p >= 0.5 for p in result.scores)),
            "stages_s": result.timings, "decode_workers": workers, "ort_threads": threads}


def plain_loop(card, tiff: Path, threads: int) -> dict:
    """The fallback peer: tifffile reads full resolution around each tile and resizes (as WSInfer
    does), onnxruntime infers; a tile is kept where the thumbnail's saturation at its centre is
    above the card's tissue threshold (no morphology)."""
    import tifffile
    from PIL import Image

    from pipelines.wsi_analysis import normalise
    from service.onnx_sessions import Predictor, build_session

    pre = card.preprocessing
    infer = Predictor(card, build_session(card, threads=threads))
    t0 = time.perf_counter()
    with tifffile.TiffFile(tiff) as tf:
        page = tf.pages[0]
        spacing = 1e4 / (page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1])
        read = int(round(pre.tile_size * pre.spacing_um / spacing))
        fh = tf.filehandle
        ntx = -(-page.shape[1] // page.tilewidth)

        def tile(ty: int, tx: int) -> np.ndarray:
            i = ty * ntx + tx
            fh.seek(page.dataoffsets[i])
            data = fh.read(page.databytecounts[i])
            return page.decode(data, i, jpegtables=page.jpegtables)[0][0]

        def region(y: int, x: int, n: int) -> np.ndarray:
            tw = page.tilewidth
            ty0, ty1, tx0, tx1 = y // tw, (y + n - 1) // tw, x // tw, (x + n - 1) // tw
            block = np.concatenate([np.concatenate([tile(ty, tx) for tx in range(tx0, tx1 + 1)], axis=1)
                                    for ty in range(ty0, ty1 + 1)], axis=0)
            return block[y - ty0 * tw: y - ty0 * tw + n, x - tx0 * tw: x - tx0 * tw + n]

        rows, cols = page.shape[0] // read, page.shape[1] // read
        thumb = tf.pages[-1].asarray()
        sat = np.asarray(Image.fromarray(thumb).convert("HSV"))[..., 1]
        sy, sx = thumb.shape[0] / (rows * read), thumb.shape[1] / (cols * read)
        batch, n = [], 0
        for r in range(rows):
            for c in range(cols):
                ty, tx = int((r + 0.5) * read * sy), int((c + 0.5) * read * sx)
                if sat[min(ty, sat.shape[0] - 1), min(tx, sat.shape[1] - 1)] <= pre.tissue_saturation:
                    continue
                patch = region(r * read, c * read, read)
                batch.append(np.asarray(Image.fromarray(patch).resize((pre.tile_size,) * 2, Image.BILINEAR)))
                if len(batch) == pre.batch_size:
                    infer(normalise(np.stack(batch), pre))
                    n += len(batch)
                    batch = []
        if batch:
            infer(normalise(np.stack(batch), pre))
            n += len(batch)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "tiles": n, "tiles_per_s": round(n / wall, 1)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peer = report["peer"]
    names = [peer, "befund"]
    rates = [report["peer_tiles_per_s"], report["befund"]["tiles_per_s"]]
    if report.get("wsinfer", {}).get("ran") and "plain_loop" in report:
        names.insert(1, "tifffile+ORT loop")
        rates.insert(1, report["plain_loop"]["tiles_per_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, rates, color=["#888888", "#aaaaaa", "#7a4f9a"][:len(names) - 1] + ["#7a4f9a"])
    for i, v in enumerate(rates):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("tissue tiles / s (CPU, 2 cores)")
    ax.set_title(f"{report['slide']}\nbefund / {peer} = {report['ratio']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=50_000)
    ap.add_argument("--height", type=int, default=40_000)
    ap.add_argument("--tumor", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from benchmarks.wsi_throughput import write
    from pipelines.model_card import load_card

    OUT.mkdir(parents=True, exist_ok=True)
    folder = write(SimpleNamespace(width=args.width, height=args.height, tumor=args.tumor, seed=args.seed,
                                   workers=args.workers))
    paths = json.loads((folder / "done.json").read_text())["paths"]
    work = OUT / "wsinfer_compare"
    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    card = load_card(MODEL)
    tiff = write_tiff(paths, slides / f"phantom_{args.width}x{args.height}_seed{args.seed}.tif", args.workers)
    report: dict = {"slide": f"{args.width}x{args.height} px, 0.25 um/px, tumor {args.tumor}, "
                             f"seed {args.seed}",
                    "cpu_cores": len(os.sched_getaffinity(0)), "tiff": tiff}
    try:
        report["export"] = export_torchscript(card, paths, work)
        config = wsinfer_config(card, work / "config.json")
        report["wsinfer_config"] = config
        report["wsinfer"] = run_wsinfer(slides, work / "wsinfer-out", work / "config.json", work / "model.pt",
                                        args.workers, card.preprocessing.batch_size)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        report["wsinfer"] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"}
    report["befund"] = run_befund(card, paths, args.workers, args.threads)
    if report["wsinfer"]["ran"]:
        report["peer"] = "WSInfer"
        report["peer_tiles_per_s"] = report["wsinfer"]["tiles_per_s_excl_startup"]
    report["plain_loop"] = plain_loop(card, Path(tiff["tiff"]), args.threads)  # a second reference
    if not report["wsinfer"]["ran"]:
        report["peer"] = "tifffile + onnxruntime loop"
        report["peer_tiles_per_s"] = report["plain_loop"]["tiles_per_s"]
    report["ratio"] = round(report["befund"]["tiles_per_s"] / report["peer_tiles_per_s"], 2)
    (OUT / "wsinfer_compare.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "wsinfer_compare.png")
    print(json.dumps({k: report[k] for k in ("peer", "peer_tiles_per_s", "ratio")}
                     | {"befund_tiles_per_s": report["befund"]["tiles_per_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
