"""Reproduce models/ich_ct/model.onnx and the validation figures in card.yaml.

    python3 -m venv .train-venv
    .train-venv/bin/pip install torch==2.13.0 numpy pydicom scikit-image onnx onnxruntime pyyaml \
        pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle
    PYTHONPATH=. .train-venv/bin/python models/ich_ct/train.py

Torch lives in .train-venv only, never in the product venv. On 2 CPU cores the whole run
(phantom generation, training, ONNX export, held-out evaluation) takes a few minutes.

Data: synthetic head-CT phantoms (phantoms/ct_head.py), never patient data. The slices go
through the product's own preprocessing (pipelines.ct_preprocess: the same window_resize and
add_context the node runs), so training and serving see identical tensors. Labels are per
slice: the bleed's cut through the slice is at least VISIBLE_AREA_MM2; slices that cut only a
sliver of a bleed are left out of the loss (neither clearly positive nor clearly negative).

Seeds: training 100000+, threshold selection 200000+, held-out evaluation 300000+ (the test
suite re-measures on 400000+). The held-out figures are measured through analyse_ct_series
on DICOM files written to a temporary folder, with an onnxruntime session. At the end,
models/ich_ct/fit_domain.py fits the card's out-of-distribution score and calibration on the
new model (its own seeds are listed there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from phantoms.ct_head import FINDINGS, make_ct_phantom, write_ct_series
from pipelines.ct_preprocess import add_context, window_resize
from pipelines.ct_triage import analyse_ct_series
from pipelines.model_card import load_card, parse_card, sha256_of
from pipelines.scoring import aggregate

HERE = Path(__file__).resolve().parent
TRAIN_SEED, SELECT_SEED, HELDOUT_SEED = 100_000, 200_000, 300_000
BLEEDS = FINDINGS[1:]


def study_plan(n: int, base: int, rng: np.random.Generator, slice_choices=(16, 20, 24, 32)):
    """Half normal studies, half bleeds spread evenly over the four types."""
    plan = []
    for i in range(n):
        finding = "none" if i % 2 == 0 else BLEEDS[(i // 2) % len(BLEEDS)]
        plan.append((finding, int(rng.choice(slice_choices)), base + i))
    return plan


def _make_training_study(args):
    finding, slices, seed, windows, size, keep = args
    ph = make_ct_phantom(finding, slices, seed)
    windowed = window_resize(ph.hu, windows, size)
    area = ph.bleed_area_mm2
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(slices, size=min(keep, slices), replace=False))
    ctx = add_context(windowed, 1, idx)  # identical to serving: same function, same order
    label = (area[idx] >= 40.0).astype(np.float32)
    weight = ((area[idx] == 0) | (area[idx] >= 40.0)).astype(np.float32)
    return ctx.astype(np.float16), label, weight


class SliceNet(nn.Module):
    """A small 2.5D CNN: strided convs, then global max + mean pooling, one logit per slice."""

    def __init__(self, channels: int = 9):
        super().__init__()

        def block(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(channels, 16, 2), block(16, 32, 2), block(32, 48, 2),
                                      block(48, 64, 2), block(64, 64, 1))
        self.head = nn.Linear(128, 1)

    def forward(self, x):
        f = self.features(x)
        pooled = torch.cat([torch.amax(f, dim=(2, 3)), torch.mean(f, dim=(2, 3))], dim=1)
        return self.head(pooled)


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers (wall time depends on who else is running)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def onnx_infer(model_path: Path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def evaluate(card, infer, plan, workdir: Path) -> dict:
    """Study-level figures through the real pipeline on DICOM files."""
    rows = []
    for finding, slices, seed in plan:
        folder = workdir / f"{seed}"
        paths = write_ct_series(folder, finding, slices, seed)
        result = analyse_ct_series(card, paths, infer)
        if not result.analysed:
            raise RuntimeError(f"held-out study {seed} not analysed: {result.reason}")
        rows.append((finding, np.array(result.scores), result.timings))
        for p in paths:
            p.unlink()
    return {"rows": rows}


def figures(rows, how: str, threshold: float) -> dict:
    labels = np.array([f != "none" for f, _, _ in rows], dtype=int)
    scores = np.array([aggregate(s, how) for _, s, _ in rows])
    pred = scores >= threshold
    per = {}
    for f in FINDINGS:
        sel = np.array([r[0] == f for r in rows])
        if sel.any():
            hits = pred[sel] if f != "none" else ~pred[sel]
            per[f] = {"n": int(sel.sum()), "correct": int(hits.sum())}
    return {
        "sensitivity": float(pred[labels == 1].mean()),
        "specificity": float((~pred[labels == 0]).mean()),
        "auc": auc(scores, labels),
        "n_studies": len(rows),
        "per_finding": per,
    }


def choose_operating_point(rows) -> tuple[str, float]:
    """On the selection set: the aggregation and threshold with the best min(sens, spec)."""
    best = None
    for how in ("top3_mean", "max"):
        for thr in np.round(np.arange(0.2, 0.91, 0.025), 3):
            f = figures(rows, how, float(thr))
            key = (min(f["sensitivity"], f["specificity"]), f["sensitivity"] + f["specificity"],
                   -abs(thr - 0.5), how == "top3_mean")
            if best is None or key > best[0]:
                best = (key, how, float(thr))
    return best[1], best[2]


def write_card(card_path: Path, sha: str, how: str, threshold: float, validation: dict) -> None:
    text = card_path.read_text()
    text = re.sub(r'(?m)^sha256: .*$', f'sha256: "{sha}"', text)
    text = re.sub(r'(?m)^  aggregation: .*$', f"  aggregation: {how}", text)
    text = re.sub(r'(?m)^  threshold: .*$', f"  threshold: {threshold}", text)
    head = text.split("\nvalidation:", 1)[0]
    body = yaml.safe_dump({"validation": validation}, sort_keys=False, allow_unicode=True)
    card_path.write_text(head.rstrip("\n") + "\n" + body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-studies", type=int, default=320)
    ap.add_argument("--slices-per-study", type=int, default=12, help="slices sampled from each study")
    ap.add_argument("--select-studies", type=int, default=60)
    ap.add_argument("--heldout-studies", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    card_path = HERE / "card.yaml"
    card = load_card(HERE, verify=False)
    pre = card.preprocessing
    rng = np.random.default_rng(0)

    plan = study_plan(args.train_studies, TRAIN_SEED, rng)
    jobs = [(f, n, s, pre.windows, pre.size, args.slices_per_study) for f, n, s in plan]
    with mp.get_context("fork").Pool(args.threads) as pool:
        parts = pool.map(_make_training_study, jobs, chunksize=4)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    w = np.concatenate([p[2] for p in parts])
    t_data = time.perf_counter() - t_start
    print(f"data: {len(x)} slices from {len(plan)} studies, {int(y.sum())} positive, "
          f"{int((w == 0).sum())} ignored, {t_data:.0f} s, {cpu_seconds():.0f} CPU s", flush=True)

    model = SliceNet(x.shape[1])
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = int(np.ceil(len(x) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch)
    pos_weight = torch.tensor(float((w * (1 - y)).sum() / max((w * y).sum(), 1.0)))
    loss_fn = nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos_weight)
    xt, yt, wt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            xb = xt[b].float()
            if torch.rand(1).item() < 0.5:  # left-right flip: bleeds occur on either side
                xb = torch.flip(xb, dims=[3])
            logits = model(xb).squeeze(1)
            loss = (loss_fn(logits, yt[b]) * wt[b]).sum() / wt[b].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x):.4f}, "
              f"{time.perf_counter() - t_start:.0f} s, {cpu_seconds():.0f} CPU s", flush=True)
    t_train = time.perf_counter() - t_start - t_data
    cpu_train = cpu_seconds()

    model.eval()
    onnx_path = HERE / "model.onnx"
    torch.onnx.export(model, torch.zeros(1, *x.shape[1:]), str(onnx_path), input_names=[card.input.name],
                      output_names=[card.output.name], opset_version=17,
                      dynamic_axes={card.input.name: {0: "batch"}, card.output.name: {0: "batch"}},
                      dynamo=False)
    del x, xt
    infer = onnx_infer(onnx_path, args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        select = evaluate(card, infer, study_plan(args.select_studies, SELECT_SEED, rng), Path(tmp))["rows"]
        how, threshold = choose_operating_point(select)
        print(f"operating point from {len(select)} selection studies: {how} >= {threshold}", flush=True)
        held = evaluate(card, infer, study_plan(args.heldout_studies, HELDOUT_SEED, rng), Path(tmp))["rows"]
    result = figures(held, how, threshold)
    sha = sha256_of(onnx_path)
    validation = {
        "data": "synthetic head-CT phantoms (phantoms/ct_head.py); no patient data",
        "level": "study",
        "sensitivity": round(result["sensitivity"], 4),
        "specificity": round(result["specificity"], 4),
        "auc": round(result["auc"], 4),
        "n_studies": result["n_studies"],
        "slices_per_study": sorted({len(s) for _, s, _ in held}),
        "seeds": f"{HELDOUT_SEED}..{HELDOUT_SEED + args.heldout_studies - 1} (held out)",
        "per_finding": result["per_finding"],
        "operating_point": {"aggregation": how, "threshold": threshold,
                            "chosen_on_seeds": f"{SELECT_SEED}..{SELECT_SEED + args.select_studies - 1}"},
        "training": {"studies": len(plan), "slices": int(len(y)), "epochs": args.epochs,
                     "parameters": int(n_params), "seconds": round(t_train + t_data),
                     "cpu_seconds": round(cpu_train),
                     "torch": str(torch.__version__)},
        "date": dt.date.today().isoformat(),
    }
    write_card(card_path, sha, how, threshold, validation)
    parse_card(yaml.safe_load(card_path.read_text()), HERE)
    load_card(HERE)  # the sha256 matches
    print(yaml.safe_dump(validation, sort_keys=False))
    # the new model's out-of-distribution score and calibration (card.yaml, reliability.png)
    from models.ich_ct import fit_domain

    fit_domain.main([f"--threads={args.threads}"])
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {cpu_seconds():.0f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
