"""Slide analysis: not-analysed reasons, heatmap vs the known tumor, negatives stay negative."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.wsi_slide import tumor_mask, write_wsi_slide
from pipelines.model_card import load_card
from pipelines.wsi_analysis import analyse_wsi_slide

MODEL = Path(__file__).resolve().parents[1] / "models" / "tumor_wsi"
W, H = 8192, 6144


def darkness(x: np.ndarray) -> np.ndarray:
    """A stand-in model: darker tiles score higher (tumor nuclei are darker and denser)."""
    m = x.mean(axis=(1, 2, 3))
    return np.stack([m, -m], axis=1) * 3


@pytest.fixture(scope="module")
def card():
    return load_card(MODEL, verify=False)  # the stand-in model needs only the card's settings


@pytest.fixture(scope="module")
def session():
    import onnxruntime as ort

    card = load_card(MODEL)  # the released model: sha256 must match the card

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {card.input.name: x})[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_wsi_slide(tmp_path_factory.mktemp("small"), 4096, 3072, 0.3, 51)


def test_blank_slide_is_not_analysed_for_lack_of_tissue(card, tmp_path):
    paths = write_wsi_slide(tmp_path, 4096, 3072, 0.0, 52, tissue=False)
    result = analyse_wsi_slide(card, paths, darkness)
    assert not result.analysed and "no tissue" in result.reason


def test_slide_without_pixel_spacing_is_not_analysed(card, small, tmp_path):
    paths = []
    for p in small:
        ds = pydicom.dcmread(p)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        ds.save_as(tmp_path / p.name)
        paths.append(tmp_path / p.name)
    result = analyse_wsi_slide(card, paths, darkness)
    assert not result.analysed and "no pixel spacing" in result.reason


def test_unsupported_codec_is_not_analysed(card, small, tmp_path):
    paths = []
    for p in small:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
        ds.save_as(tmp_path / p.name)
        paths.append(tmp_path / p.name)
    result = analyse_wsi_slide(card, paths, darkness)
    assert not result.analysed and "not supported" in result.reason


def test_heatmap_shape_keys_and_process_decoding_agree(card, small):
    serial = analyse_wsi_slide(card, small, darkness)
    with ProcessPoolExecutor(2) as pool:
        parallel = analyse_wsi_slide(card, small, darkness, executor=pool)
    hm = serial.heatmap
    assert serial.analysed and hm["rows"] * hm["cols"] == len(hm["values"])
    assert (hm["rows"], hm["cols"]) == (7, 10)  # 1536 / 224, 2048 / 224 rounded up at 0.5 um/px
    assert hm["spacing_um"] == 0.5 and hm["tile_size_px"] == 224
    assert hm["values"] == parallel.heatmap["values"]
    inside = [v for v in hm["values"] if v >= 0]
    assert len(inside) == serial.measurements["tiles_analysed"] > 0
    assert [k.sop_instance_uid for k in serial.key_images] == [hm["level_sop_instance_uid"]] * 3
    assert all(k.frame and 1 <= k.frame <= 48 for k in serial.key_images)
    assert {"tissue", "decode", "infer", "postprocess"} <= set(serial.timings)


@pytest.fixture(scope="module")
def tumor_slide(tmp_path_factory):
    return write_wsi_slide(tmp_path_factory.mktemp("tumor"), W, H, 0.4, 61)


def test_tumor_heatmap_overlaps_the_known_tumor(card, session, tumor_slide):
    result = analyse_wsi_slide(card, tumor_slide, session)
    assert result.analysed and result.present
    hm = result.heatmap
    grid = np.array(hm["values"]).reshape(hm["rows"], hm["cols"])
    base_px = hm["tile_size_px"] * hm["spacing_um"] / 0.25
    truth = tumor_mask(W, H, 0.4, 61, grid.shape, cell_size=base_px)
    pred = grid >= 0.5
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice >= 0.7, f"Dice {dice:.3f}"
    assert result.measurements["tumor_area_mm2"] > 0


def test_normal_slide_is_negative(card, session, tmp_path):
    result = analyse_wsi_slide(card, write_wsi_slide(tmp_path, W, H, 0.0, 62), session)
    assert result.analysed and result.present is False, result.score
    assert result.certainty > 0.5
