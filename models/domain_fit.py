"""What the reference models' fit scripts share: the OOD score, the calibration, their figures.

Used by models/*/fit_domain.py, which train.py calls after it exports the model, and which also
run on their own on the released model.onnx (no torch needed): the network and its figures
stay as released, only `validated_domain.ood` and `calibration` in card.yaml and the
reliability diagram beside it are (re)written.

- OOD score: Mahalanobis distance of a feature vector (pipelines.domain.FEATURES) from the
  mean of the training phantoms, with their sample covariance; the threshold is MARGIN times
  the largest distance among the fit and the selection phantoms, so that no in-domain phantom
  seen so far would be refused; the rejection rate on held-out phantoms (seeds used nowhere
  else) is measured and written, and must be <= 1 %.
- Calibration: temperature scaling of the study (slide) score around the card's threshold,
  fit on calibration seeds kept apart from the held-out seeds it is reported on, by maximum
  a posteriori: the labels' likelihood times a log-normal prior on the temperature (log T ~
  N(0, 1)). Phantom sets are often separated without an error, and then the likelihood alone
  always prefers a sharper model (T -> 0, every verdict certain); the prior keeps T where
  the data do not argue strongly. The certainty is capped at 1 - 1/(n + 2) for n calibration
  cases (Laplace's rule of succession: n verdicts without an error cannot support more).
- ECE: top-label expected calibration error, 10 equal-width bins of certainty over 0.5-1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from pipelines.model_card import ModelCard, parse_card

MARGIN = 1.2
PRIOR_SD = 1.0  # of log T: temperatures within e^-1..e^1 are plausible before the data say more
MAX_HELD_OUT_REJECTION = 0.01
ECE_BINS = 10


# --- OOD ----------------------------------------------------------------------------------------


def fit_ood(fit: np.ndarray, select: np.ndarray) -> dict[str, Any]:
    """Mean, inverse covariance and threshold from the fit set; the threshold also covers `select`."""
    mean = fit.mean(axis=0)
    cov = np.cov(fit.T)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2.0
    distances = mahalanobis(mean, precision, np.concatenate([fit, select]))
    return {"mean": mean, "precision": precision, "threshold": float(MARGIN * distances.max()),
            "largest_in_domain": float(distances.max())}


def mahalanobis(mean: np.ndarray, precision: np.ndarray, features: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(features) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


def rejections(fitted: dict[str, Any], features: np.ndarray) -> dict[str, Any]:
    """How many of `features` the fitted score refuses, and the distances' range."""
    d = mahalanobis(fitted["mean"], fitted["precision"], features)
    return {"n": int(len(d)), "rejected": int((d > fitted["threshold"]).sum()),
            "rate": round(float((d > fitted["threshold"]).mean()), 4),
            "distance_min": round(float(d.min()), 2), "distance_max": round(float(d.max()), 2)}


def ood_block(features: str, names: tuple[str, ...], fitted: dict[str, Any], fit: dict[str, Any]) -> dict:
    """The card's `validated_domain.ood` mapping."""
    return {
        "features": features,
        "names": list(names),
        "mean": [float(f"{v:.6g}") for v in fitted["mean"]],
        "precision": [[float(f"{v:.6g}") for v in row] for row in fitted["precision"]],
        "threshold": round(fitted["threshold"], 3),
        "fit": fit,
    }


# --- calibration ----------------------------------------------------------------------------------


def onnx_infer(card: ModelCard, threads: int):
    """The card's released model.onnx as `infer` (batch -> first output), on `threads` CPU threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run([card.output.name], {card.input.name: x})[0]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def calibrated(scores: np.ndarray, threshold: float, temperature: float, cap: float) -> np.ndarray:
    """Probability of present, as pipelines.model_card.Calibration computes it."""
    z = (_logit(scores) - _logit(np.array(threshold))) / temperature
    return np.clip(1 / (1 + np.exp(-z)), 1 - cap, cap)


def fit_temperature(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Temperature by maximum a posteriori (log T ~ N(0, PRIOR_SD)) and the certainty cap."""
    labels = np.asarray(labels, bool)
    if not labels.any() or labels.all():
        raise ValueError("calibration needs positive and negative cases")
    y = labels.astype(np.float64)
    z = _logit(scores) - _logit(np.array(threshold))

    def loss(log_t: float) -> float:
        p = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-15, 1 - 1e-15)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() + log_t**2 / (2 * PRIOR_SD**2))

    grid = np.linspace(-4.0, 4.0, 1601)  # T from 0.02 to 55 in steps of 0.5 %: the loss is smooth
    log_t = float(grid[int(np.argmin([loss(g) for g in grid]))])
    return {"temperature": float(np.exp(log_t)), "max_certainty": 1.0 - 1.0 / (len(y) + 2),
            "errors": int(((np.asarray(scores) >= threshold) != labels).sum())}


def ece(p_present: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: certainty = max(p, 1 - p), bins over 0.5-1."""
    p = np.asarray(p_present, np.float64)
    labels = np.asarray(labels, bool)
    certainty = np.maximum(p, 1 - p)
    correct = (p >= 0.5) == labels
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(certainty, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - certainty[sel].mean())
    return float(total)


def scores_summary(p_present: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = np.clip(np.asarray(p_present, np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, np.float64)
    return {"ece": round(ece(p, labels), 4), "brier": round(float(((p - y) ** 2).mean()), 5),
            "nll": round(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), 4),
            "max_certainty": round(float(np.maximum(p, 1 - p).max()), 6)}


def reliability_png(path: Path, title: str, labels: np.ndarray,
                    curves: dict[str, np.ndarray], bins: int = ECE_BINS) -> None:
    """A reliability diagram (Pillow, no plotting library): observed frequency of the finding
    against the predicted probability, per bin, one marker series per curve (area ~ count)."""
    size, pad = 640, 70
    img = Image.new("RGB", (size, size + 30), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = pad, size - pad + 30, size - 30, 70

    def at(px: float, py: float) -> tuple[float, float]:
        return x0 + px * (x1 - x0), y0 - py * (y0 - y1)

    draw.rectangle([x0, y1, x1, y0], outline="black")
    for t in np.linspace(0, 1, 6):
        draw.line([at(t, 0), (at(t, 0)[0], y0 + 5)], fill="black")
        draw.text((at(t, 0)[0] - 8, y0 + 8), f"{t:.1f}", fill="black")
        draw.line([(x0 - 5, at(0, t)[1]), at(0, t)], fill="black")
        draw.text((x0 - 35, at(0, t)[1] - 6), f"{t:.1f}", fill="black")
        draw.line([at(t, 0), at(t, 1)], fill=(235, 235, 235))
        draw.line([at(0, t), at(1, t)], fill=(235, 235, 235))
    draw.line([at(0, 0), at(1, 1)], fill=(150, 150, 150), width=1)
    draw.text((x0, 10), title, fill="black")
    draw.text(((x0 + x1) / 2 - 110, size), "predicted probability of the finding", fill="black")
    draw.text((8, y1 - 24), "observed frequency", fill="black")
    colours = [(200, 60, 40), (30, 90, 200), (40, 150, 60)]
    y = np.asarray(labels, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    for k, (name, p) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        points = []
        for b in range(bins):
            sel = which == b
            if not sel.any():
                continue
            cx, cy = at(float(np.mean(p[sel])), float(y[sel].mean()))
            r = 3 + 9 * np.sqrt(sel.sum() / len(p))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
            points.append((cx, cy))
        if len(points) > 1:
            draw.line(points, fill=colour, width=1)
        draw.text((x0 + 12, y1 + 10 + 16 * k), f"o {name} (ECE {ece(p, labels):.4f})", fill=colour)
    draw.text((x0 + 12, y1 + 10 + 16 * len(curves)), f"n = {len(y)}, marker area ~ cases per bin",
              fill="black")
    img.save(path, optimize=True)


# --- the card ---------------------------------------------------------------------------------------


def _dump(key: str, value: Any, indent: int) -> str:
    text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None, width=100,
                          allow_unicode=True)
    return "".join(" " * indent + line + "\n" for line in text.splitlines())


def load_unfitted_card(folder: Path) -> ModelCard:
    """The card without its fitted parts (`validated_domain.ood`, `calibration`): what a fit
    starts from, even when the old fit no longer matches the feature code."""
    data = yaml.safe_load((folder / "card.yaml").read_text())
    data.pop("calibration", None)
    (data.get("validated_domain") or {}).pop("ood", None)
    card = parse_card(data, folder)
    card.verify_file()
    return card


def write_fitted(card_path: Path, ood: dict[str, Any], calibration: dict[str, Any] | None) -> None:
    """Replace `validated_domain.ood` and the top-level `calibration` in card.yaml, keeping the
    rest of the text (comments included) as it is; with `calibration` None the card has none."""
    text = card_path.read_text()
    if not re.search(r"(?m)^validated_domain:\n", text):
        raise ValueError(f"{card_path}: no validated_domain to add the OOD score to")
    text = re.sub(r"(?ms)^  ood:\n.*?(?=^\S)", "", text)  # the old score, up to the next top key
    text = re.sub(r"(?ms)^calibration:\n.*?(?=^\S)", "", text)
    start = re.search(r"(?m)^validated_domain:\n", text).end()
    end = re.search(r"(?m)^\S", text[start:])
    cut = start + (end.start() if end else len(text) - start)
    fitted = _dump("ood", ood, 2) + (_dump("calibration", calibration, 0) if calibration is not None else "")
    text = text[:cut] + fitted + text[cut:]
    card_path.write_text(text)
