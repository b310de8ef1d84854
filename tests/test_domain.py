"""The applicability domain and the calibrated certainty of the reference cards.

Inputs outside what a model was validated on are "not analysed: outside the model's validated
domain (...)", never a positive or a negative: a plastic head phantom, a chest CT labelled
HEAD, an MR series relabelled CT, a contrast CTA (with and without its contrast tag), pure
noise; for slides, an immunohistochemistry look, a green-shifted H&E and a stated non-H&E
stain. The data-driven OOD score alone refuses every CT kind (its explicit checks
taken away), for ich_ct and for the segmentation model ich_seg, which has its own fit of the
same score on its own input. Held-out phantoms pass (tests/test_*_model_accuracy.py re-measure the figures
through the same check). Two studies go through the running node: the plastic phantom comes
back as a "not analysed" SR, a bleed with the card's calibrated certainty in API and SR.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from phantoms.ct_ood import write_ood_series
from phantoms.wsi_slide import write_wsi_slide
from pipelines.ct_triage import analyse_ct_series
from pipelines.model_card import ValidatedDomain, load_card
from pipelines.sr_reading import read_result_sr
from pipelines.tasks import task_of
from pipelines.wsi_analysis import analyse_wsi_slide
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import poll
from tests.pacs_results import results_for_study
from tests.validators import dciodvfy_errors

MODELS = Path(__file__).resolve().parents[1] / "models"
CT_KINDS = ("plastic_shell", "chest", "mr", "cta", "noise")
SEED = 800_000  # used by no fit script and no other test


def _session(card):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {card.input.name: x})[0]


@pytest.fixture(scope="module")
def ich():
    card = load_card(MODELS / "ich_ct")
    return card, _session(card)


@pytest.fixture(scope="module")
def ich_seg():
    card = load_card(MODELS / "ich_seg")
    return card, _session(card)


@pytest.fixture(scope="module")
def tumor():
    card = load_card(MODELS / "tumor_wsi")
    return card, _session(card)


def _score_only(card):
    """The card with its explicit checks taken away: only the OOD score stands."""
    domain = card.validated_domain
    return dataclasses.replace(card, validated_domain=ValidatedDomain(
        ood=domain.ood, never_validated_on=domain.never_validated_on))


# --- the cards --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ich_ct", "tumor_wsi"])
def test_cards_declare_their_domain_calibration_and_what_they_were_never_validated_on(name):
    card = load_card(MODELS / name)
    domain, calibration = card.validated_domain, card.calibration
    assert domain is not None and domain.ood is not None and calibration is not None
    assert any("real" in line for line in domain.never_validated_on)
    fit = domain.ood.fit
    assert fit["held_out"]["rate"] <= 0.01
    assert calibration.fit["before"]["ece"] >= 0 and calibration.fit["after"]["ece"] >= 0
    assert (card.folder / calibration.fit["reliability_diagram"]).is_file()
    assert calibration.fit["sensitivity_after_domain_check"] >= 0.9
    assert calibration.fit["specificity_after_domain_check"] >= 0.9


@pytest.mark.parametrize("name", ["ich_ct", "tumor_wsi"])
def test_calibration_keeps_every_verdict_and_never_says_certain(name):
    card = load_card(MODELS / name)
    threshold, calibration = card.postprocessing.threshold, card.calibration
    for score in np.concatenate([np.linspace(0, 1, 201), [1e-9, threshold - 1e-6, threshold, 1 - 1e-9]]):
        p = calibration.probability(float(score), threshold)
        assert (p >= 0.5) == (score >= threshold), (score, p)
        assert max(p, 1 - p) <= calibration.max_certainty < 1.0


# --- CT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CT_KINDS)
def test_out_of_domain_ct_is_not_analysed_never_a_verdict(ich, kind, tmp_path):
    card, infer = ich
    result = analyse_ct_series(card, write_ood_series(tmp_path, kind, 20, SEED), infer)
    assert not result.analysed and result.present is None and result.certainty is None
    assert "outside the ich_ct model's validated domain" in result.reason, result.reason


@pytest.mark.parametrize("kind", [*CT_KINDS, "cta_unlabelled"])
def test_the_ood_score_alone_refuses_every_ct_kind(ich, kind, tmp_path):
    card, infer = ich
    result = analyse_ct_series(_score_only(card), write_ood_series(tmp_path, kind, 20, SEED + 1), infer)
    assert not result.analysed
    assert "image statistics unlike the validation data" in result.reason and "OOD distance" in result.reason


@pytest.mark.parametrize("kind", CT_KINDS)
def test_out_of_domain_ct_gets_no_segmentation_and_no_volume(ich_seg, kind, tmp_path):
    card, infer = ich_seg
    result = task_of(card).analyse(card, write_ood_series(tmp_path, kind, 20, SEED + 4), infer)
    assert not result.analysed and result.present is None and result.segmentation is None
    assert "outside the ich_seg model's validated domain" in result.reason, result.reason


@pytest.mark.parametrize("kind", [*CT_KINDS, "cta_unlabelled"])
def test_the_segmentation_models_ood_score_alone_refuses_every_ct_kind(ich_seg, kind, tmp_path):
    card, infer = ich_seg
    result = task_of(card).analyse(_score_only(card), write_ood_series(tmp_path, kind, 20, SEED + 5), infer)
    assert not result.analysed
    assert "image statistics unlike the validation data" in result.reason and "OOD distance" in result.reason


def test_which_explicit_check_refuses_which_kind(ich, tmp_path):
    """The reason names the check: a radiographer can tell a CTA from a chest from noise."""
    card, infer = ich
    reasons = {kind: analyse_ct_series(card, write_ood_series(tmp_path / kind, kind, 20, SEED + 2),
                                       infer).reason for kind in ("chest", "cta")}
    assert "(pixel spacing 0.72 mm; validated 0.45-0.51 mm)" in reasons["chest"]
    assert "(contrast agent named in ContrastBolusAgent; validated non-contrast scans only)" in reasons["cta"]


# --- slides -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stain,why", [("ihc", "OOD distance"), ((1.0, 2.2, 1.0), "OOD distance")])
def test_out_of_domain_slides_are_not_analysed(tumor, tmp_path, stain, why):
    card, infer = tumor
    result = analyse_wsi_slide(card, write_wsi_slide(tmp_path, 4096, 3072, 0.3, SEED % 10_000, stain=stain),
                               infer)
    assert not result.analysed and result.present is None
    assert "outside the tumor_wsi model's validated domain" in result.reason and why in result.reason


def test_restained_h_and_e_within_the_validated_range_is_analysed(tumor, tmp_path):
    card, infer = tumor
    result = analyse_wsi_slide(card, write_wsi_slide(tmp_path, 6144, 4608, 0.3, 7301, stain=(1.5, 1.3, 1.4)),
                               infer)
    assert result.analysed, result.reason
    assert result.present and result.measurements["ood_distance"] <= card.validated_domain.ood.threshold


def test_a_slide_that_names_another_stain_is_refused_naming_it(tumor, tmp_path):
    card, infer = tumor
    paths = write_wsi_slide(tmp_path, 4096, 3072, 0.0, 7302)
    for path in paths:
        ds = pydicom.dcmread(path)
        step = pydicom.Dataset()
        name, value = pydicom.Dataset(), pydicom.Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "424361007", "SCT", "Using substance"
        value.CodeValue, value.CodingSchemeDesignator = "C0101", "99LOCAL"
        value.CodeMeaning = "Ki-67 antibody"
        item = pydicom.Dataset()
        item.ValueType = "CODE"
        item.ConceptNameCodeSequence, item.ConceptCodeSequence = [name], [value]
        step.SpecimenPreparationStepContentItemSequence = [item]
        ds.SpecimenDescriptionSequence[0].SpecimenPreparationSequence = [step]
        ds.save_as(path)
    result = analyse_wsi_slide(card, paths, infer)
    assert not result.analysed
    assert "(stain ki-67 antibody; validated hematoxylin stain + water soluble eosin stain)" in result.reason


# --- through the running node -------------------------------------------------------------------


@pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")
def test_plastic_head_phantom_through_the_node_is_not_analysed_never_flagged(node, pacs, tmp_path):
    """The case of the issue: "TRAUMA/PLAIN HEAD", BRAIN, 5 mm, no brain and no blood."""
    files = write_ood_series(tmp_path, "plastic_shell", 24, SEED + 3)
    assert run_storescu(files, ae="CT", port=node.dicom_port, timeout=120).returncode == 0
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    study = node.wait_study_state(study_uid, {"not analysed", "delivered"}, timeout=120)
    assert study["state"] == "not analysed" and study["present"] is None and study["priority"] != "high"
    assert "outside the ich_ct model's validated domain" in study["reason"]
    [sr] = poll(lambda: results_for_study(pacs.directory, study_uid, "SR"), 60, 0.25, "SR at the PACS")
    info = read_result_sr(sr)
    assert info["present"] is None and "validated domain" in info["not_analysed_reason"]
    assert dciodvfy_errors(sr.filename) == []


@pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")
def test_api_and_sr_carry_the_calibrated_certainty(node, pacs, tmp_path):
    card = load_card(MODELS / "ich_ct", verify=False)
    files = write_ct_series(tmp_path, "subdural", 20, SEED + 4)
    assert run_storescu(files, ae="CT", port=node.dicom_port, timeout=120).returncode == 0
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    study = node.wait_study_state(study_uid, {"delivered"}, timeout=120)
    expected = card.calibration.probability(study["score"], card.postprocessing.threshold)
    assert study["present"] is True
    assert study["certainty"] == pytest.approx(expected, abs=1e-9)
    assert study["certainty"] != pytest.approx(study["score"], abs=1e-6)  # not the raw score
    [sr] = poll(lambda: results_for_study(pacs.directory, study_uid, "SR"), 60, 0.25, "SR at the PACS")
    assert read_result_sr(sr)["certainty"] == pytest.approx(expected, abs=1e-4)
