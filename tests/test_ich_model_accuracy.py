"""The reference ICH model keeps its released figures on fresh phantom seeds, through the real pipeline.

Seeds 400000+ are used nowhere in training, threshold selection or the card's own held-out
set (models/ich_ct/train.py uses 100000+, 200000+ and 300000+). Series are short (16 or 20
slices) so that 100+ studies run in a couple of minutes on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from phantoms.ct_head import FINDINGS, make_ct_phantom, series_from_phantom
from pipelines.ct_triage import analyse_ct_series
from pipelines.model_card import load_card

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "ich_ct"
SEED0 = 400_000
N_STUDIES = 104  # half normal, half bleeds: 13 of each of the four types


def _plan() -> list[tuple[str, int, int]]:
    bleeds = FINDINGS[1:]
    return [("none" if i % 2 == 0 else bleeds[(i // 2) % 4], 16 if i % 4 < 2 else 20, SEED0 + i)
            for i in range(N_STUDIES)]


def _session(card):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == card.input.name
    return lambda x: session.run([card.output.name], {card.input.name: x})[0]


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def card():
    return load_card(MODEL_DIR)  # also checks that model.onnx matches the card's sha256


@pytest.fixture(scope="module")
def outcomes(card, tmp_path_factory):
    infer = _session(card)
    root = tmp_path_factory.mktemp("ich")
    rows = []
    for finding, slices, seed in _plan():
        folder = root / str(seed)
        folder.mkdir()
        paths = []
        phantom = make_ct_phantom(finding, slices, seed)
        for ds in series_from_phantom(phantom):
            path = folder / f"{int(ds.InstanceNumber):03d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        result = analyse_ct_series(card, paths, infer)
        assert result.analysed, result.reason
        calcified = bool(phantom.calcification_area_mm2.max() >= 3.0)
        rows.append((finding, seed, result, calcified, phantom.bleed_area_mm2))
        for p in paths:
            p.unlink()
    return rows


def test_card_says_synthetic_and_not_for_clinical_use(card):
    assert "NOT for clinical use" in card.intended_use and "synthetic" in card.intended_use
    assert card.validation["n_studies"] >= 100
    assert card.validation["sensitivity"] >= 0.9 and card.validation["specificity"] >= 0.9


def test_held_out_sensitivity_and_specificity_are_at_least_0_9(outcomes):
    labels = np.array([f != "none" for f, *_ in outcomes])
    present = np.array([r.present for _, _, r, *_ in outcomes])
    sensitivity = present[labels].mean()
    specificity = (~present[~labels]).mean()
    assert len(outcomes) >= 100
    assert {f for f, *_ in outcomes} == set(FINDINGS)
    assert sensitivity >= 0.9, f"sensitivity {sensitivity:.3f}"
    assert specificity >= 0.9, f"specificity {specificity:.3f}"


def test_held_out_auc_is_high(outcomes):
    labels = np.array([f != "none" for f, *_ in outcomes])
    scores = np.array([r.score for _, _, r, *_ in outcomes])
    assert _auc(scores, labels) >= 0.95


def test_every_bleed_type_is_mostly_found(outcomes):
    for finding in FINDINGS[1:]:
        hits = [r.present for f, _, r, *_ in outcomes if f == finding]
        assert len(hits) >= 13 and np.mean(hits) >= 0.75, (finding, np.mean(hits))


def test_calcifications_do_not_make_normal_studies_positive(outcomes):
    normals_with_calcs = 0
    for finding, seed, result, calcified, _ in outcomes:
        if finding == "none" and calcified:  # a calcification is inside the covered slices
            normals_with_calcs += 1
            assert not result.present, f"normal study {seed} with calcifications called positive"
    assert normals_with_calcs >= 30


def test_key_images_of_a_positive_study_show_the_bleed(outcomes):
    for finding, seed, result, _, bleed_area in outcomes:
        if finding == "none" or not result.present:
            continue
        best = int(np.argmax(result.scores))
        assert bleed_area[max(best - 1, 0): best + 2].max() > 0, (finding, seed)


def test_held_out_studies_pass_the_domain_check_with_calibrated_certainty(card, outcomes):
    """Every held-out phantom is inside the validated domain (the fixture asserts each was
    analysed), and its certainty is the card's calibration of its score, never 1."""
    ood, calibration = card.validated_domain.ood, card.calibration
    distances = [r.measurements["ood_distance"] for _, _, r, *_ in outcomes]
    assert max(distances) <= ood.threshold
    for _, _, result, *_ in outcomes:
        p = calibration.probability(result.score, card.postprocessing.threshold)
        assert result.certainty == pytest.approx(max(p, 1 - p))
        assert result.certainty <= calibration.max_certainty < 1.0
