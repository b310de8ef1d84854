"""From raw model outputs to one study score, the same way for every task.

A task runs its model on slices, tiles or volumes; what turns the raw outputs into a
probability of the card's positive class, and many such probabilities into one study score,
does not depend on the task: both are the card's `output` and `postprocessing.aggregation`.
"""

from __future__ import annotations

import numpy as np

from pipelines.model_card import ModelCard

AGGREGATIONS = ("max", "top3_mean", "noisy_or")


def positive_probability(raw: np.ndarray, card: ModelCard) -> np.ndarray:
    """(n, n_classes) raw outputs -> (n,) probability of the card's positive class."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    out = card.output
    col = out.classes.index(out.positive_class) if raw.shape[1] == len(out.classes) else raw.shape[1] - 1
    if out.activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-raw[:, col]))
    if out.activation == "softmax":
        z = raw - raw.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e[:, col] / e.sum(axis=1)
    return np.clip(raw[:, col], 0.0, 1.0)


def aggregate(probabilities: np.ndarray, how: str) -> float:
    """Slice (tile) probabilities -> one study probability (`max`, `top3_mean` or `noisy_or`)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    if how == "max":
        return float(p.max())
    if how == "top3_mean":
        return float(np.sort(p)[-3:].mean())
    if how == "noisy_or":
        return float(1.0 - np.exp(np.sum(np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12)))))
    raise ValueError(f"unknown aggregation {how!r}")
