"""The figures a reader of a diagnostic study expects, each with its uncertainty.

Proportions (sensitivity, specificity, PPV, NPV) get Wilson score intervals: they stay inside
0..1 and stay honest at 0 of n or n of n, where the textbook normal interval collapses to a
point. ROC AUC is the Mann-Whitney statistic (ties count half) with a stratified percentile
bootstrap interval. Calibration: equal-width bins of the stated probability, the observed
rate in each, and the expected calibration error (ECE) weighted by bin size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> dict[str, Any] | None:
    """k of n with its Wilson 95 % interval; None when n is 0 (nothing to estimate)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)
    return {"value": round(p, 4), "ci95": [lo, hi],
            "k": k, "n": n}


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    labels, predicted = np.asarray(labels, bool), np.asarray(predicted, bool)
    return {"tp": int(np.sum(labels & predicted)), "fp": int(np.sum(~labels & predicted)),
            "tn": int(np.sum(~labels & ~predicted)), "fn": int(np.sum(labels & ~predicted))}


def binary_figures(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    c = confusion(labels, predicted)
    return {"confusion": c,
            "sensitivity": wilson(c["tp"], c["tp"] + c["fn"]),
            "specificity": wilson(c["tn"], c["tn"] + c["fp"]),
            "ppv": wilson(c["tp"], c["tp"] + c["fp"]),
            "npv": wilson(c["tn"], c["tn"] + c["fn"]),
            "accuracy": wilson(c["tp"] + c["tn"], sum(c.values()))}


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """P(score of a random positive > that of a random negative), ties half; None with one class."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def auc_with_interval(labels: np.ndarray, scores: np.ndarray, resamples: int = 2000,
                      seed: int = 0) -> dict[str, Any] | None:
    """AUC with a stratified percentile bootstrap 95 % interval (positives and negatives are
    resampled separately, so every resample has both classes)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    point = auc(labels, scores)
    if point is None:
        return None
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels], scores[~labels]
    draws = []
    for _ in range(max(0, resamples)):
        p = pos[rng.integers(0, len(pos), len(pos))]
        n = neg[rng.integers(0, len(neg), len(neg))]
        draws.append(auc(np.r_[np.ones(len(p), bool), np.zeros(len(n), bool)], np.r_[p, n]))
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (point, point))
    return {"value": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "bootstrap_resamples": resamples, "positives": len(pos), "negatives": len(neg)}


def roc_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """(false positive rate, true positive rate) at every distinct threshold, for the plot."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    n_pos, n_neg = max(1, labels.sum()), max(1, (~labels).sum())
    tpr = [float(np.sum(labels & (scores >= t)) / n_pos) for t in thresholds]
    fpr = [float(np.sum(~labels & (scores >= t)) / n_neg) for t in thresholds]
    return {"fpr": fpr, "tpr": tpr}


def calibration(labels: np.ndarray, probability: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability per equal-width bin of P(present) and the ECE over all studies."""
    labels, probability = np.asarray(labels, float), np.asarray(probability, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        predicted, observed = float(probability[mask].mean()), float(labels[mask].mean())
        ece += mask.sum() / len(labels) * abs(observed - predicted)
        rows.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "n": int(mask.sum()),
                     "mean_probability": round(predicted, 4), "observed_rate": round(observed, 4)})
    return {"bins": rows, "ece": round(ece, 4) if len(labels) else None, "n": int(len(labels))}


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Agreement of two binary raters beyond chance; None when there is nothing to compare,
    1.0 when both agree on every study and chance agreement is already total."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if len(a) == 0:
        return None
    observed = float(np.mean(a == b))
    chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return round((observed - chance) / (1.0 - chance), 4)
