"""The tumor_wsi model still earns the figures on its card, re-measured on fresh phantom seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.tumor_wsi.train import auc, make_set, to_tensor
from phantoms.wsi_slide import write_wsi_slide
from pipelines.model_card import load_card
from pipelines.wsi_analysis import analyse_wsi_slide

MODEL = Path(__file__).resolve().parents[1] / "models" / "tumor_wsi"
FRESH_TILE_SEEDS = range(7100, 7104)  # neither training (1000-1015) nor card validation seeds
FRESH_SLIDES = [(7201, 0.3), (7202, 0.15), (7203, 0.0), (7204, 0.0)]


@pytest.fixture(scope="module")
def card_and_infer():
    import onnxruntime as ort

    card = load_card(MODEL)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return card, lambda x: sess.run(None, {card.input.name: x})[0]


def test_tile_auc_on_fresh_seeds_matches_the_card(card_and_infer):
    card, infer = card_and_infer
    x, y = make_set(FRESH_TILE_SEEDS, 15, np.random.default_rng(7))
    logits = np.concatenate([infer(to_tensor(x[i:i + 64])) for i in range(0, len(x), 64)])
    p = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    clear = (y >= 0.5) | (y <= 0.1)
    measured = auc(p[clear], (y[clear] >= 0.5).astype(int))
    assert measured >= max(0.9, card.validation["tile_auc"] - 0.05), measured


def test_slide_verdicts_on_fresh_seeds(card_and_infer, tmp_path):
    card, infer = card_and_infer
    tp = tn = 0
    for seed, tumor in FRESH_SLIDES:
        paths = write_wsi_slide(tmp_path / str(seed), 6144, 4608, tumor, seed)
        result = analyse_wsi_slide(card, paths, infer)
        assert result.analysed, result.reason  # inside the validated domain
        assert result.measurements["ood_distance"] <= card.validated_domain.ood.threshold
        p = card.calibration.probability(result.score, card.postprocessing.threshold)
        assert result.certainty == pytest.approx(max(p, 1 - p))
        assert result.certainty <= card.calibration.max_certainty
        tp += bool(tumor) and result.present
        tn += (not tumor) and not result.present
    assert (tp / 2, tn / 2) == (1.0, 1.0)  # sensitivity, specificity on two slides each
