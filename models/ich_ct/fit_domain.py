"""Fit the ICH card's out-of-distribution score and calibration on the released model.onnx.

    .venv/bin/python models/ich_ct/fit_domain.py      # or: train.py calls it after exporting

No torch: it runs the ONNX model, so the network and the card's validation figures stay as
they are; it rewrites `validated_domain.ood` and `calibration` in card.yaml and writes
reliability.png beside it (models/domain_fit.py says how each is fit).

Seeds (phantoms/ct_head.py), each set used for one purpose only:
  100000+  OOD fit (the training seeds' phantoms: what the model was trained on)
  200000+  OOD threshold selection (the seeds train.py chose the operating point on)
  300000+  held-out report: OOD rejection, ECE before/after, sensitivity/specificity after
           the domain check and calibration (the seeds of the card's held-out figures)
  500000+  calibration fit (never used by train.py or the tests; 240 studies: the certainty
           cap, 1 - 1/(n + 2), grows with them)
  700000+  out-of-domain kinds (phantoms/ct_ood.py)
The test suite re-measures on 400000+ (tests/test_ich_model_accuracy.py, tests/test_domain.py).
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
from pipelines.ct_preprocess import window_resize
from pipelines.ct_triage import analyse_ct_series
from pipelines.domain import FEATURES
from pipelines.model_card import OodScore, load_card

HERE = Path(__file__).resolve().parent
FEATURE_SET = "ct_hu_fractions_v1"
FIT_SEED, SELECT_SEED, HELDOUT_SEED, CALIBRATION_SEED, OOD_SEED = 100_000, 200_000, 300_000, 500_000, 700_000
SLICES = (16, 20, 24, 32)  # as in training and the card's held-out figures
LONG = (60, 120, 300)  # 2.7, 1.3 and 0.53 mm spacing: the low end of the validated spacing


def plan(n: int, base: int, slices=SLICES, long_every: int = 0) -> list[tuple[str, int, int]]:
    """Half normal, half bleeds of the four types; every `long_every`-th study a long series."""
    out = []
    for i in range(n):
        finding = "none" if i % 2 == 0 else FINDINGS[1 + (i // 2) % 4]
        count = LONG[(i // long_every) % len(LONG)] if long_every and i % long_every == long_every - 1 \
            else slices[(i // 2) % len(slices)]
        out.append((finding, count, base + i))
    return out


def _features(args) -> np.ndarray:
    finding, slices, seed, windows, size = args
    hu = make_ct_phantom(finding, slices, seed).hu
    return FEATURES[FEATURE_SET].compute(window_resize(hu, windows, size), windows)


def features_of(card, studies, threads: int) -> np.ndarray:
    pre = card.preprocessing
    jobs = [(f, n, s, pre.windows, pre.size) for f, n, s in studies]
    with mp.get_context("fork").Pool(threads) as pool:
        return np.array(pool.map(_features, jobs, chunksize=2))


def through_pipeline(card, infer, studies, workdir: Path) -> list:
    """(finding, slices, seed, result) through analyse_ct_series on written DICOM files."""
    rows = []
    for finding, slices, seed in studies:
        paths = write_ct_series(workdir / str(seed), finding, slices, seed)
        rows.append((finding, slices, seed, analyse_ct_series(card, paths, infer)))
        for p in paths:
            p.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-studies", type=int, default=240)
    ap.add_argument("--select-studies", type=int, default=120)
    ap.add_argument("--heldout-studies", type=int, default=120)
    ap.add_argument("--calibration-studies", type=int, default=240)
    ap.add_argument("--ood-seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    card = load_unfitted_card(HERE)
    raw_card = dataclasses.replace(card, calibration=None, validated_domain=dataclasses.replace(
        card.validated_domain, ood=None))
    names = FEATURES[FEATURE_SET].names

    fit_plan = plan(args.fit_studies, FIT_SEED, long_every=8)
    select_plan = plan(args.select_studies, SELECT_SEED, long_every=8)
    fitted = fit_ood(features_of(card, fit_plan, args.threads), features_of(card, select_plan, args.threads))
    print(f"OOD fit on {len(fit_plan)} + {len(select_plan)} phantoms: largest in-domain distance "
          f"{fitted['largest_in_domain']:.2f}, threshold {fitted['threshold']:.2f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    score = OodScore(FEATURE_SET, names, tuple(fitted["mean"]), tuple(map(tuple, fitted["precision"])),
                     fitted["threshold"])
    domain_card = dataclasses.replace(card, calibration=None, validated_domain=dataclasses.replace(
        card.validated_domain, ood=score))
    infer = onnx_infer(card, args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        held_plan = plan(args.heldout_studies, HELDOUT_SEED, long_every=20)
        held = through_pipeline(domain_card, infer, held_plan, work)
        calib = through_pipeline(raw_card, infer, plan(args.calibration_studies, CALIBRATION_SEED), work)
        ood_rows = {}
        for kind in OOD_KINDS:
            refused, by_score = 0, 0
            for s in range(args.ood_seeds):
                paths = write_ood_series(work / f"{kind}-{s}", kind, 20, OOD_SEED + s)
                result = analyse_ct_series(domain_card, paths, infer)
                refused += not result.analysed
                by_score += "OOD distance" in result.reason or _score_refuses(card, score, paths)
            ood_rows[kind] = {"n": args.ood_seeds, "refused": refused, "refused_by_ood_score": by_score}
            print(f"out of domain {kind}: {refused}/{args.ood_seeds} refused, {by_score} by the OOD score "
                  f"alone", flush=True)
    print(f"pipeline runs done ({time.perf_counter() - t0:.0f} s)", flush=True)

    held_rejected = [r for r in held if not r[3].analysed]
    if len(held_rejected) > MAX_HELD_OUT_REJECTION * len(held):
        raise SystemExit(f"OOD score refuses {len(held_rejected)} of {len(held)} held-out phantoms: "
                         f"{[r[3].reason for r in held_rejected]}")
    if any(not r[3].analysed for r in calib):
        reasons = [r[3].reason for r in calib if not r[3].analysed]
        raise SystemExit(f"calibration study not analysed: {reasons}")
    threshold = card.postprocessing.threshold
    c_scores = np.array([r[3].score for r in calib])
    c_labels = np.array([r[0] != "none" for r in calib])
    temp = fit_temperature(c_scores, c_labels, threshold)
    analysed = [r for r in held if r[3].analysed]
    h_scores = np.array([r[3].score for r in analysed])
    h_labels = np.array([r[0] != "none" for r in analysed])
    after = calibrated(h_scores, threshold, temp["temperature"], temp["max_certainty"])
    before_fig, after_fig = scores_summary(h_scores, h_labels), scores_summary(after, h_labels)
    present = np.array([r[3].present for r in analysed])
    long = np.array([r[1] in LONG for r in analysed])
    reliability_png(HERE / "reliability.png",
                    f"ich_ct {card.version}: held-out phantoms (seeds {HELDOUT_SEED}+), study level",
                    h_labels, {"before (raw score)": h_scores, "after (temperature scaling)": after})

    distances = [r[3].measurements["ood_distance"] for r in analysed]
    held_fig = {"n": len(held), "rejected": len(held_rejected),
                "rate": round(len(held_rejected) / len(held), 4),
                "distance_max_analysed": round(max(distances), 2)}
    ood = ood_block(FEATURE_SET, names, fitted, {
        "method": "Mahalanobis distance from the fit phantoms' mean, their sample covariance",
        "why_these_features": "robust HU statistics of the model's own input; on the phantoms and the "
                              "out-of-domain kinds below they separate every kind by 1.5x the threshold "
                              "or more (the network exposes only its logits, so penultimate features "
                              "would need a changed model file)",
        "fit_on": f"{len(fit_plan)} phantoms, seeds {FIT_SEED}.. (the training seeds)",
        "threshold_rule": f"{fitted['threshold'] / fitted['largest_in_domain']:.1f} x the largest distance "
                          f"({fitted['largest_in_domain']:.2f}) among the fit phantoms and "
                          f"{len(select_plan)} selection phantoms (seeds {SELECT_SEED}..)",
        "held_out": {"seeds": f"{HELDOUT_SEED}..{HELDOUT_SEED + len(held) - 1}", **held_fig},
        "out_of_domain": ood_rows,
    })
    calibration = {
        "method": "temperature",
        "temperature": round(temp["temperature"], 4),
        "max_certainty": round(temp["max_certainty"], 4),
        "fit": {
            "fit_on": f"{len(calib)} phantoms, seeds {CALIBRATION_SEED}..{CALIBRATION_SEED + len(calib) - 1} "
                      "(used for nothing else)",
            "estimate": "maximum a posteriori, log T ~ N(0, 1); cap 1 - 1/(n + 2)",
            "errors_in_calibration_set": temp["errors"],
            "reported_on": f"{len(analysed)} held-out phantoms, seeds {HELDOUT_SEED}.. (the OOD score "
                           f"refused {len(held_rejected)})",
            "before": before_fig,
            "after": after_fig,
            "sensitivity_after_domain_check": round(float(present[h_labels].mean()), 4),
            "specificity_after_domain_check": round(float((~present[~h_labels]).mean()), 4),
            "long_series_correct": f"{int((present == h_labels)[long].sum())} of {int(long.sum())} "
                                   f"({', '.join(str(n) for n in LONG)} slices)",
            "reliability_diagram": "reliability.png",
            "date": dt.date.today().isoformat(),
        },
    }
    write_fitted(HERE / "card.yaml", ood, calibration)
    load_card(HERE)  # the card still parses and the file's sha256 still matches
    print(f"ECE before {before_fig['ece']}, after {after_fig['ece']}; temperature {temp['temperature']:.3f}; "
          f"held-out rejected {len(held_rejected)}/{len(held)}; total {time.perf_counter() - t0:.0f} s")
    return 0


def _score_refuses(card, score: OodScore, paths) -> bool:
    """Whether the OOD score alone refuses a series (its headers may be refused first)."""
    import pydicom

    from pipelines.domain import mahalanobis

    pre = card.preprocessing
    headers = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in headers])
    features = FEATURES[score.features].compute(window_resize(hu.astype(np.float32), pre.windows, pre.size),
                                                pre.windows)
    return mahalanobis(score, features) > score.threshold


if __name__ == "__main__":
    sys.exit(main())
