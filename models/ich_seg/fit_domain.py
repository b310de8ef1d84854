"""Fit the ich_seg card's out-of-distribution score and calibration on the released model.onnx.

    .venv/bin/python models/ich_seg/fit_domain.py

Without it the segmentation model checked headers only, and a series whose headers fit but
whose image is no head like the phantoms (a real head, a plastic phantom, contrast) was
segmented: a volume and a flag from a model that never saw such an image. The score is
ich_ct's (pipelines/domain.py `ct_hu_fractions_v1`, models/domain_fit.py says how it is
fit), computed on this model's own input (uint8 windows at 256 px), so its mean, covariance
and threshold are fitted here. The calibration turns the segmented volume into the certainty
of the verdict: temperature scaling of `presence_score` (V / (V + min_volume_ml)) around 0.5,
fit as ich_ct's is (models/domain_fit.py), so the verdict never changes. No torch: it runs the
ONNX model; it rewrites `validated_domain.ood` and `calibration` in card.yaml and writes
reliability.png beside it.

Seeds (phantoms/ct_head.py), each set used for one purpose only, as in train.py:
  110000+  OOD fit (the training seeds' phantoms: what the model was trained on)
  210000+  OOD threshold selection (the seeds train.py chose the voxel threshold on)
  310000+  held-out report: OOD rejection, ECE before/after, sensitivity/specificity
  510000+  calibration fit (used for nothing else)
  700000+  out-of-domain kinds (phantoms/ct_ood.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from models.domain_fit import (
    MAX_HELD_OUT_REJECTION,
    calibrated,
    fit_ood,
    fit_temperature,
    load_unfitted_card,
    onnx_infer,
    ood_block,
    reliability_png,
    scores_summary,
    write_fitted,
)
from phantoms.ct_head import FINDINGS, make_ct_phantom, write_ct_series
from phantoms.ct_ood import OOD_KINDS, write_ood_series
from pipelines.ct_volume import u8_slice_mean_features, window_u8
from pipelines.domain import FEATURES, mahalanobis
from pipelines.model_card import OodScore, load_card
from pipelines.tasks import task_of
from pipelines.tasks.ct_segmentation import PRESENCE_THRESHOLD, presence_score

HERE = Path(__file__).resolve().parent
FEATURE_SET = "ct_hu_fractions_v1"
FIT_SEED, SELECT_SEED, HELDOUT_SEED, CALIBRATION_SEED, OOD_SEED = 110_000, 210_000, 310_000, 510_000, 700_000
SLICES = (16, 20, 24, 32)  # as in training and the card's held-out figures


def plan(n: int, base: int) -> list[tuple[str, int, int]]:
    """Half normal, half bleeds of the four types, the slice counts in turn."""
    return [("none" if i % 2 == 0 else FINDINGS[1 + (i // 2) % 4], SLICES[(i // 2) % len(SLICES)], base + i)
            for i in range(n)]


def _features(args) -> np.ndarray:
    finding, slices, seed, windows, size = args
    stack = window_u8(make_ct_phantom(finding, slices, seed).hu, windows, size)
    return u8_slice_mean_features(FEATURES[FEATURE_SET].compute, stack, windows)


def features_of(card, studies, threads: int) -> np.ndarray:
    pre = card.preprocessing
    jobs = [(f, n, s, pre.windows, pre.size) for f, n, s in studies]
    with mp.get_context("fork").Pool(threads) as pool:
        return np.array(pool.map(_features, jobs, chunksize=2))


def score_refuses(card, score: OodScore, paths) -> bool:
    """Whether the OOD score alone refuses a series (its headers may be refused first)."""
    pre = card.preprocessing
    headers = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in headers])
    stack = window_u8(hu.astype(np.float32), pre.windows, pre.size)
    features = u8_slice_mean_features(FEATURES[score.features].compute, stack, pre.windows)
    return mahalanobis(score, features) > score.threshold


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-studies", type=int, default=240)
    ap.add_argument("--select-studies", type=int, default=120)
    ap.add_argument("--heldout-studies", type=int, default=50)
    ap.add_argument("--calibration-studies", type=int, default=120)
    ap.add_argument("--ood-seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    card = load_unfitted_card(HERE)
    names = FEATURES[FEATURE_SET].names
    fit_plan, select_plan = plan(args.fit_studies, FIT_SEED), plan(args.select_studies, SELECT_SEED)
    fitted = fit_ood(features_of(card, fit_plan, args.threads), features_of(card, select_plan, args.threads))
    print(f"OOD fit on {len(fit_plan)} + {len(select_plan)} phantoms: largest in-domain distance "
          f"{fitted['largest_in_domain']:.2f}, threshold {fitted['threshold']:.2f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    score = OodScore(FEATURE_SET, names, tuple(fitted["mean"]), tuple(map(tuple, fitted["precision"])),
                     fitted["threshold"])
    domain_card = dataclasses.replace(card, calibration=None, validated_domain=dataclasses.replace(
        card.validated_domain, ood=score))
    task, infer = task_of(domain_card), onnx_infer(card, args.threads)
    held, calib, ood_rows = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rows, base, n in ((held, HELDOUT_SEED, args.heldout_studies),
                              (calib, CALIBRATION_SEED, args.calibration_studies)):
            for finding, slices, seed in plan(n, base):
                paths = write_ct_series(work / str(seed), finding, slices, seed)
                rows.append((finding, task.analyse(domain_card, paths, infer)))
                for path in paths:
                    path.unlink()
        print(f"held-out and calibration studies analysed ({time.perf_counter() - t0:.0f} s)", flush=True)
        for kind in OOD_KINDS:
            refused, by_score = 0, 0
            for s in range(args.ood_seeds):
                paths = write_ood_series(work / f"{kind}-{s}", kind, 20, OOD_SEED + s)
                result = task.analyse(domain_card, paths, infer)
                refused += not result.analysed
                by_score += "OOD distance" in result.reason or score_refuses(card, score, paths)
            ood_rows[kind] = {"n": args.ood_seeds, "refused": refused, "refused_by_ood_score": by_score}
            print(f"out of domain {kind}: {refused}/{args.ood_seeds} refused, {by_score} by the OOD score "
                  f"alone", flush=True)
    rejected = [r.reason for _, r in held if not r.analysed]
    if len(rejected) > MAX_HELD_OUT_REJECTION * len(held):
        raise SystemExit(f"OOD score refuses {len(rejected)} of {len(held)} held-out phantoms: {rejected}")
    if any(not r.analysed for _, r in calib):
        raise SystemExit(f"calibration study not analysed: {[r.reason for _, r in calib if not r.analysed]}")
    min_volume = card.postprocessing.min_volume_ml

    def scores(rows):
        return np.array([presence_score(r.measurements["volume_ml"], min_volume) for _, r in rows])

    c_labels = np.array([f != "none" for f, _ in calib])
    temp = fit_temperature(scores(calib), c_labels, PRESENCE_THRESHOLD)
    analysed_rows = [(f, r) for f, r in held if r.analysed]
    h_scores, h_labels = scores(analysed_rows), np.array([f != "none" for f, _ in analysed_rows])
    after = calibrated(h_scores, PRESENCE_THRESHOLD, temp["temperature"], temp["max_certainty"])
    before_fig, after_fig = scores_summary(h_scores, h_labels), scores_summary(after, h_labels)
    present = np.array([r.present for _, r in analysed_rows])
    reliability_png(HERE / "reliability.png",
                    f"ich_seg {card.version}: held-out phantoms (seeds {HELDOUT_SEED}+), study level",
                    h_labels, {"before (V / (V + V0))": h_scores, "after (temperature scaling)": after})
    analysed = [r for _, r in held if r.analysed]
    correct = sum(r.present == (f != "none") for f, r in held if r.analysed)
    ood = ood_block(FEATURE_SET, names, fitted, {
        "method": "Mahalanobis distance from the fit phantoms' mean, their sample covariance",
        "why_these_features": "ich_ct's robust HU statistics (the same phantoms, the same windows), "
                              "computed on this model's own uint8 256 px input",
        "fit_on": f"{len(fit_plan)} phantoms, seeds {FIT_SEED}.. (the training seeds)",
        "threshold_rule": f"{fitted['threshold'] / fitted['largest_in_domain']:.1f} x the largest distance "
                          f"({fitted['largest_in_domain']:.2f}) among the fit phantoms and "
                          f"{len(select_plan)} selection phantoms (seeds {SELECT_SEED}..)",
        "held_out": {"seeds": f"{HELDOUT_SEED}..{HELDOUT_SEED + len(held) - 1}", "n": len(held),
                     "rejected": len(rejected), "rate": round(len(rejected) / len(held), 4),
                     "distance_max_analysed": round(max(r.measurements["ood_distance"] for r in analysed), 2),
                     "presence_correct": f"{correct} of {len(analysed)}"},
        "out_of_domain": ood_rows,
    })
    calibration = {
        "method": "temperature",
        "temperature": round(temp["temperature"], 4),
        "max_certainty": round(temp["max_certainty"], 4),
        "fit": {
            "score": f"presence_score: V / (V + {min_volume:g} mL), the segmented volume V; present from 0.5",
            "fit_on": f"{len(calib)} phantoms, seeds {CALIBRATION_SEED}..{CALIBRATION_SEED + len(calib) - 1} "
                      "(used for nothing else)",
            "estimate": "maximum a posteriori, log T ~ N(0, 1); cap 1 - 1/(n + 2)",
            "errors_in_calibration_set": temp["errors"],
            "reported_on": f"{len(analysed_rows)} held-out phantoms, seeds {HELDOUT_SEED}.. (the OOD score "
                           f"refused {len(rejected)})",
            "before": before_fig,
            "after": after_fig,
            "sensitivity_after_domain_check": round(float(present[h_labels].mean()), 4),
            "specificity_after_domain_check": round(float((~present[~h_labels]).mean()), 4),
            "reliability_diagram": "reliability.png",
            "date": dt.date.today().isoformat(),
        },
    }
    write_fitted(HERE / "card.yaml", ood, calibration)
    load_card(HERE)  # the card still parses and the file's sha256 still matches
    print(f"ECE before {before_fig['ece']}, after {after_fig['ece']}; temperature {temp['temperature']:.3f}; "
          f"held-out rejected {len(rejected)}/{len(held)}; presence correct {correct}/{len(analysed)}; "
          f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
