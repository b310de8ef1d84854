"""The ich_seg model and the ct-segmentation task: accuracy re-measured on phantoms never used
in training, and the whole path through the real node with Orthanc as the PACS, ich_ct and
ich_seg both running on the same head CT.

Accuracy runs through the task's own analysis (DICOM files -> load -> window -> segment ->
volume), the result crossing the model-service boundary as JSON, masks compared with the
phantom's known bleed (`CtPhantom.bleed_mask`) on the 512 x 512 source matrix.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from phantoms.ct_head import FINDINGS, make_ct_phantom, series_from_phantom
from pipelines.ct_volume import dice, mask_to_runs, runs_to_mask, volume_ml
from pipelines.findings import AnalysisResult
from pipelines.key_images import MIN_SIZE, OUTLINE_RGB
from pipelines.model_card import CardError, load_card, parse_card
from pipelines.sr_reading import read_result_sr
from pipelines.tasks import task_of
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import PROJECT, TOKEN, RunningNode
from tests.orthanc_peer import ORTHANC, OrthancPeer
from tests.validators import dciodvfy_errors

MODEL = PROJECT / "models" / "ich_seg"
HELD_OUT_SEED = 410_000  # train.py uses 110000+ (training), 210000+ (selection), 310000+ (card)
SLICES = 20


@pytest.fixture(scope="module")
def card():
    return load_card(MODEL)


@pytest.fixture(scope="module")
def infer(card):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {card.input.name: x})[0]


def analyse_phantom(card, infer, tmp_path, finding, seed, slices=SLICES):
    """The phantom, the task's result (after a JSON round trip) and the mask it segmented."""
    ph = make_ct_phantom(finding, slices, seed)
    paths = []
    for k, ds in enumerate(series_from_phantom(ph)):
        paths.append(tmp_path / f"{seed}-{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    result = task_of(card).analyse(card, paths, infer)
    result = AnalysisResult.from_dict(json.loads(json.dumps(result.to_dict())))
    index = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(paths)}
    mask = np.zeros(ph.hu.shape, dtype=bool)
    seg = result.segmentation or {"slices": []}
    for s in seg["slices"]:
        mask[index[s["sop_instance_uid"]]] = runs_to_mask(s["runs"], seg["rows"], seg["columns"])
    return ph, result, mask


def test_masks_cross_as_runs_and_runs_outside_the_matrix_are_refused():
    mask = np.random.default_rng(1).random((64, 48)) > 0.7
    assert np.array_equal(runs_to_mask(mask_to_runs(mask), 64, 48), mask)
    for bad in ([0, 64 * 48 + 1], [-1, 2], [5, 0], [1, 2, 3]):
        with pytest.raises(ValueError):
            runs_to_mask(bad, 64, 48)
    with pytest.raises(ValueError):
        runs_to_mask([0, 1], 100_000, 100_000)  # a peer's size is checked before allocating
    with pytest.raises(ValueError):
        runs_to_mask([0, 1] * (64 * 48 + 1), 64, 48)  # more runs than pixels: refused unread
    assert volume_ml(2000, (0.5, 0.5), 4.0) == pytest.approx(2.0)


def test_card_errors_name_the_segmentation_fields(card):
    data = yaml.safe_load((MODEL / "card.yaml").read_text())
    for field, value in (("threshold", 1.5), ("min_volume_ml", -1)):
        bad = {**data, "postprocessing": {**data["postprocessing"], field: value}}
        with pytest.raises(CardError, match=f"postprocessing.{field}"):
            parse_card(bad, MODEL)
    assert card.postprocessing.min_volume_ml > 0


def test_held_out_bleeds_reach_the_cards_dice_and_volume_goals(card, infer, tmp_path):
    dices, errors = [], []
    for i, finding in enumerate(FINDINGS[1:] * 2):
        ph, result, mask = analyse_phantom(card, infer, tmp_path, finding, HELD_OUT_SEED + i)
        assert result.analysed and result.present, (finding, result.reason, result.measurements)
        assert 0.5 < result.certainty <= card.calibration.max_certainty < 1.0  # calibrated, never certain
        truth = volume_ml(int(ph.bleed_mask.sum()), (ph.pixel_spacing_mm,) * 2, ph.slice_spacing_mm)
        measured = result.measurements["volume_ml"]
        assert measured == pytest.approx(volume_ml(int(mask.sum()), (ph.pixel_spacing_mm,) * 2,
                                                   ph.slice_spacing_mm), rel=1e-3)
        dices.append(dice(mask, ph.bleed_mask))
        errors.append(abs(measured - truth) / truth)
    assert np.mean(dices) >= 0.8, dices
    assert np.median(errors) <= 0.10, errors


def test_normal_head_is_absent_with_no_segmentation(card, infer, tmp_path):
    _, result, mask = analyse_phantom(card, infer, tmp_path, "none", HELD_OUT_SEED + 50)
    assert result.analysed and result.present is False
    assert result.segmentation is None and not task_of(card).has_seg(card, result)
    assert result.measurements["volume_ml"] < card.postprocessing.min_volume_ml
    assert 0.5 < result.certainty <= card.calibration.max_certainty < 1.0


def test_the_calibrated_certainty_keeps_every_verdict_the_volume_gives(card):
    """Present exactly from min_volume_ml on, whatever the calibration; the certainty of the
    stated verdict grows with the distance from that volume and stays below the card's cap."""
    from pipelines.tasks.ct_segmentation import PRESENCE_THRESHOLD, presence_score

    v0, calibration = card.postprocessing.min_volume_ml, card.calibration
    assert calibration is not None and calibration.fit["sensitivity_after_domain_check"] >= 0.9
    assert (card.folder / calibration.fit["reliability_diagram"]).is_file()
    volumes = np.concatenate([[0.0, v0 * (1 - 1e-6), v0, v0 * (1 + 1e-6)], np.geomspace(1e-3, 500, 200)])
    certainties = []
    for volume in volumes:
        p = calibration.probability(presence_score(volume, v0), PRESENCE_THRESHOLD)
        assert (p >= 0.5) == (volume >= v0), (volume, p)
        assert max(p, 1 - p) <= calibration.max_certainty < 1.0
        certainties.append(max(p, 1 - p))
    above = volumes[4:] >= v0
    assert np.all(np.diff(np.array(certainties[4:])[above]) >= -1e-12)  # larger bleed, surer


def test_card_states_synthetic_training_and_its_held_out_figures(card):
    assert card.task == "ct-segmentation"
    assert "synthetic" in card.intended_use and "NOT for clinical use" in card.intended_use
    v = card.validation
    assert v["dice_mean"] >= 0.8 and v["volume_error_median"] <= 0.10
    assert v["training"]["cpu_seconds"] < 2 * 20 * 60  # under 20 minutes on 2 cores


# --- through the real node, Orthanc as the PACS ----------------------------------------------


@pytest.fixture(scope="module")
def node_and_pacs(tmp_path_factory):
    if not Path(ORTHANC).exists() or not have_dcmtk():
        pytest.skip("needs Debian's orthanc and dcmtk")
    work = tmp_path_factory.mktemp("ich-seg")
    models = work / "models"
    models.mkdir()
    for name in ("ich_ct", "ich_seg"):
        (models / name).symlink_to(PROJECT / "models" / name)
    node = RunningNode(work / "node", models_dir=str(models))
    with OrthancPeer(node.config["ae_title"], node.dicom_port, lua=True, stable_age=2) as pacs:
        node.config["destinations"] = [f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}"]
        with node:
            yield node, pacs


def in_orthanc(pacs: OrthancPeer, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    out = []
    for series in pacs.find_series(study_uid, modality):
        for instance_id in series["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(pacs.rest_get(f"/instances/{instance_id}/file")))
            ds.orthanc_study = series["ParentStudy"]
            out.append(ds)
    return out


def test_head_ct_gets_triage_sr_and_seg_with_volume_in_the_same_orthanc_study(node_and_pacs, tmp_path):
    node, pacs = node_and_pacs
    ph = make_ct_phantom("subdural", 24, HELD_OUT_SEED + 60)
    sent = []
    for k, ds in enumerate(series_from_phantom(ph)):
        sent.append(tmp_path / f"ct-{k:03d}.dcm")
        ds.save_as(sent[-1], enforce_file_format=True)
    study_uid = pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID
    stored = run_storescu(sent, port=pacs.dicom_port, called_ae=pacs.ae, timeout=120)
    assert stored.returncode == 0, stored.output

    def results():
        srs, segs = in_orthanc(pacs, study_uid, "SR"), in_orthanc(pacs, study_uid, "SEG")
        return (srs, segs) if len(srs) >= 2 and segs else None

    srs, [seg] = pacs.wait_for(results, 150, "2 SRs and a SEG in Orthanc")
    infos = {read_result_sr(sr)["algorithm"]["name"]: read_result_sr(sr) for sr in srs}
    assert set(infos) == {"ich_ct", "ich_seg"}
    assert infos["ich_ct"]["present"] is True and infos["ich_seg"]["present"] is True
    assert 0.5 < infos["ich_seg"]["certainty"] < 1.0  # the SR states the calibrated certainty
    one_study = {sr.orthanc_study for sr in srs} | {seg.orthanc_study}
    assert len(one_study) == 1 and seg.StudyInstanceUID == study_uid

    # the SR's volume (UCUM ml) is measured on the SEG's segment, which it references
    seg_info = infos["ich_seg"]
    [volume] = [m for m in seg_info["measurements"] if m["code"]["value"] == "118565006"]
    assert volume["unit"] == "ml"
    truth = volume_ml(int(ph.bleed_mask.sum()), (ph.pixel_spacing_mm,) * 2, ph.slice_spacing_mm)
    assert volume["value"] == pytest.approx(truth, rel=0.25)
    assert seg.SOPInstanceUID in seg_info["referenced_sop_instance_uids"]

    # the SEG: valid, read back by highdicom, over the sent slices, where the bleed is
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []
    back = hd.seg.segread(path)
    assert back.SegmentationType == "BINARY" and back.get_segment_numbers() == [1]
    assert back.get_segment_description(1).segmented_property_type.value == "1386000"
    sent_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sent]
    sources = [uid for _, _, uid in back.get_source_image_uids()]
    assert sources and set(sources) <= set(sent_uids)
    pixels = back.get_pixels_by_source_instance(sources, segment_numbers=[1])[..., 0].astype(bool)
    truth_mask = ph.bleed_mask[[sent_uids.index(u) for u in sources]]
    assert dice(pixels, truth_mask) > 0.6
    assert volume_ml(int(pixels.sum()), (ph.pixel_spacing_mm,) * 2, ph.slice_spacing_mm) == \
        pytest.approx(volume["value"], rel=1e-3)
    study = node.wait_study_state(study_uid, {"delivered"})
    assert {j["model"] for j in study["jobs"]} == {"ich_ct", "ich_seg"}
    # the reader's row: the classifier's verdict and certainty lead, the segmentation's volume
    # beside them; the key images: ich_ct's slices, then ich_seg's with its mask outlined
    assert study["model"] == "ich_ct" and study["present"] is True and study["certainty"] > 0.5
    assert study["volume_model"] == "ich_seg"
    assert study["volume_ml"] == pytest.approx(volume["value"], rel=1e-3)
    views = [(i, v["label"]) for i, v in enumerate(study["key_image_views"])]
    seg_views = [(i, label) for i, label in views if label.startswith("ich_seg: ")]
    assert seg_views and all("cm\u00b2 segmented" in label for _, label in seg_views), views
    assert any(label.startswith("ich_ct: ") for _, label in views)
    index, label = seg_views[0]
    k = int(re.search(r"slice (\d+) of 24", label).group(1)) - 1
    request = urllib.request.Request(f"{node.url}/studies/{study_uid}/key-images/{index}.png",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        rgb = np.asarray(Image.open(io.BytesIO(answer.read())).convert("RGB"))
    assert rgb.shape[1] >= MIN_SIZE and rgb.shape[0] > MIN_SIZE
    outline = np.all(rgb[:MIN_SIZE] == np.array(OUTLINE_RGB, dtype=np.uint8), axis=-1)
    near_bleed = ndimage.binary_dilation(ph.bleed_mask[k], iterations=4)  # 512 matrix = 512 px
    assert outline.sum() > 50 and (outline & near_bleed).sum() / outline.sum() > 0.95


def test_on_a_tilted_gantry_the_masks_lie_on_the_slices_as_stored(card, infer, tmp_path):
    """The model segments the shear-corrected stack; the SEG and the key image outline the
    slices as the scanner stored them, each image k x step rows lower than the first."""
    from phantoms.ct_head import tilt_geometry

    ph = make_ct_phantom("subdural", SLICES, HELD_OUT_SEED + 7)
    step, _ = tilt_geometry(ph, 20.0)
    assert step >= 2
    paths = []
    for k, ds in enumerate(series_from_phantom(ph, gantry_tilt_deg=20.0)):
        paths.append(tmp_path / f"tilted-{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    result = task_of(card).analyse(card, paths, infer)
    assert result.analysed and result.present, result.reason
    index = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(paths)}
    seg = result.segmentation
    mask = np.zeros(ph.hu.shape, dtype=bool)
    for s in seg["slices"]:
        mask[index[s["sop_instance_uid"]]] = runs_to_mask(s["runs"], seg["rows"], seg["columns"])
    as_stored = np.zeros_like(ph.bleed_mask)
    for k in range(len(ph.hu)):
        shift = k * step
        as_stored[k, shift:] = ph.bleed_mask[k, :ph.hu.shape[1] - shift]
    assert dice(mask, as_stored) >= 0.8
    assert dice(mask, as_stored) > dice(mask, ph.bleed_mask) + 0.1  # not on the upright slices


def test_a_source_without_its_type_2_patient_and_study_attributes_still_gets_a_valid_seg_and_sr(
        card, infer, tmp_path):
    """De-identifiers often drop type 2 attributes (a real de-identified head CT had no
    PatientBirthDate): highdicom's Segmentation raised on it and the job failed. The objects
    befund writes carry them, empty, and pass dciodvfy."""
    from pipelines.result_uids import result_uids

    dropped = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName")
    ph = make_ct_phantom("intraparenchymal", SLICES, HELD_OUT_SEED + 11)
    paths = []
    for k, ds in enumerate(series_from_phantom(ph)):
        for keyword in dropped:
            if keyword in ds:
                delattr(ds, keyword)
        paths.append(tmp_path / f"bare-{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    task = task_of(card)
    result = task.analyse(card, paths, infer)
    assert result.analysed and result.present, result.reason
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert all(k not in headers[0] for k in dropped)
    uids = result_uids(str(headers[0].SeriesInstanceUID), card.key, 1)
    for name, obj in (("seg", task.build_seg(card, result, headers, uids, 1)),
                      ("sr", task.build_sr(card, result, headers, uids, 1, None))):
        path = tmp_path / f"{name}.dcm"
        obj.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
        written = pydicom.dcmread(path)
        assert all(k in written and not written[k].value for k in dropped), name
    assert all(k not in headers[0] for k in dropped)  # the source headers themselves unchanged
