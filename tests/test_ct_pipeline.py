"""The CT pipeline: stack checks with reasons a radiographer can act on, preprocessing, key images."""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.ct_head import make_ct_phantom, write_ct_series
from pipelines.ct_preprocess import add_context, context_indices, preprocess_ct, window_resize
from pipelines.ct_series import load_ct_series
from pipelines.ct_triage import analyse_ct_series
from pipelines.findings import NotAnalysable
from pipelines.model_card import load_card
from pipelines.scoring import aggregate, positive_probability

CARD_DIR = Path(__file__).resolve().parents[1] / "models" / "ich_ct"


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR, verify=False)


@pytest.fixture(scope="module")
def pre(card):
    return replace(card.preprocessing, min_slices=4)


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct")
    write_ct_series(out, "subdural", slices=18, seed=21)
    return out


def _paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def test_shuffled_files_come_back_sorted_along_the_stack(series_dir, pre):
    paths = _paths(series_dir)
    shuffled = paths[:]
    random.Random(1).shuffle(shuffled)
    series = load_ct_series(shuffled, pre)
    assert [Path(h.path) for h in series.headers] == paths  # written inferior to superior
    assert np.all(np.diff(series.positions_mm) > 0)
    truth = make_ct_phantom("subdural", 18, 21).hu
    assert np.array_equal(series.hu, truth)
    assert series.hu.dtype == np.int16


def test_decoding_in_worker_processes_gives_the_same_stack(series_dir, pre):
    paths = _paths(series_dir)
    with ProcessPoolExecutor(2) as pool:
        series = load_ct_series(paths, pre, executor=pool, chunk_size=5)
    assert np.array_equal(series.hu, load_ct_series(paths, pre).hu)


def test_too_short_series_is_not_analysed_with_the_count(series_dir, card):
    series_uid = pydicom.dcmread(_paths(series_dir)[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(NotAnalysable) as err:
        load_ct_series(_paths(series_dir)[:1], card.preprocessing)
    assert str(err.value) == f"series {series_uid} not analysed: 1 slice, the model needs at least 16"


def test_mixed_orientations_are_not_analysed(series_dir, pre, tmp_path):
    paths = _paths(series_dir)
    ds = pydicom.dcmread(paths[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice mixed in
    ds.save_as(tmp_path / "coronal.dcm")
    with pytest.raises(NotAnalysable, match="mixed image orientations"):
        load_ct_series([*paths[:3], tmp_path / "coronal.dcm", *paths[4:]], pre)


def test_a_gap_in_the_stack_is_not_analysed_with_where_it_is(series_dir, pre):
    paths = _paths(series_dir)
    gap = replace(pre, max_slice_gap_mm=6.0)
    with pytest.raises(NotAnalysable, match=r"mm gap between slices at .* \(at most 6 mm allowed\)"):
        load_ct_series(paths[:5] + paths[8:], gap)


def test_duplicate_positions_are_not_analysed(series_dir, pre):
    paths = _paths(series_dir)
    with pytest.raises(NotAnalysable, match="two slices at the same position"):
        load_ct_series(paths + paths[:1], pre)


def test_undecodable_pixel_data_names_the_transfer_syntax(series_dir, pre, tmp_path):
    paths = _paths(series_dir)
    ds = pydicom.dcmread(paths[2])
    ds.compress(pydicom.uid.RLELossless)
    ds.PixelData = ds.PixelData[:200]  # truncated fragment
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(NotAnalysable, match=r"could not decode broken.dcm \(RLE Lossless\)"):
        load_ct_series([*paths[:2], tmp_path / "broken.dcm", *paths[3:]], pre)


def test_not_a_dicom_file_is_not_analysed(tmp_path, pre):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(NotAnalysable, match="not a readable DICOM file"):
        load_ct_series([bad], pre)


def test_windows_map_hounsfield_units_to_zero_one(card):
    pre = card.preprocessing
    hu = np.zeros((3, 512, 512), dtype=np.int16)
    hu[0] = -1000  # air
    hu[1] = 40  # brain-window centre
    hu[2] = 80  # blood: top of the brain window, 0.5 in the subdural window
    hu[2, :256] = 2000
    x = window_resize(hu, pre.windows, pre.size)
    assert x.shape == (3, 3, 128, 128) and x.dtype == np.float32
    assert np.allclose(x[0], 0)
    assert np.allclose(x[1, 0], 0.5) and np.allclose(x[1, 1], 0.3)
    assert np.allclose(x[2, 0], 1) and np.allclose(x[2, 1, 64:], 0.5)
    assert np.allclose(x[2, 2, :64], 1) and np.allclose(x[2, 2, 64:], (80 + 800) / 2800)
    # the float path (no integer factor) agrees with the integer path on a uniform image
    y = window_resize(hu[:, :500, :500].astype(np.float32), pre.windows, pre.size)
    assert np.allclose(y[1], x[1], atol=1e-5)


def test_a_non_square_matrix_is_padded_with_air(card):
    hu = np.full((2, 256, 512), 40, dtype=np.int16)
    x = window_resize(hu, card.preprocessing.windows, 128)
    assert x.shape == (2, 3, 128, 128)
    assert np.allclose(x[:, 0, :32], 0) and np.allclose(x[:, 0, 40:88], 0.5)


def test_context_channels_are_window_major_with_edge_slices_repeated(card):
    pre = card.preprocessing
    assert context_indices(4, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    windowed = np.arange(4.0)[:, None, None, None] + np.array([0, 10, 20])[None, :, None, None]
    windowed = np.broadcast_to(windowed, (4, 3, 8, 8)).astype(np.float32)
    ctx = add_context(windowed, 1)
    assert ctx.shape == (4, 9, 8, 8)
    assert ctx[0, :, 0, 0].tolist() == [0, 0, 1, 10, 10, 11, 20, 20, 21]
    assert ctx[3, :, 0, 0].tolist() == [2, 3, 3, 12, 13, 13, 22, 23, 23]
    hu = make_ct_phantom("none", 5, 1).hu
    full = preprocess_ct(hu, pre)
    assert full.shape == (5, *card.input.shape[1:]) and full.dtype == np.float32
    lazy = add_context(window_resize(hu, pre.windows, pre.size), 1, np.arange(2, 4))
    assert np.array_equal(lazy, full[2:4])


def test_activation_and_aggregations(card):
    assert np.allclose(positive_probability(np.array([[0.0], [100.0]]), card), [0.5, 1.0])
    p = np.array([0.1, 0.9, 0.8, 0.7, 0.0])
    assert aggregate(p, "max") == pytest.approx(0.9)
    assert aggregate(p, "top3_mean") == pytest.approx(0.8)
    assert aggregate(p, "noisy_or") == pytest.approx(1 - 0.9 * 0.1 * 0.2 * 0.3)
    assert aggregate(p[:2], "top3_mean") == pytest.approx(0.5)


def _bright_slices(x: np.ndarray) -> np.ndarray:
    """A stand-in model: the logit grows with blood-range pixels in the centre slice's subdural window."""
    sub = x[:, 4]
    return ((np.mean((sub > 0.3) & (sub < 0.55), axis=(1, 2)) - 0.1) * 20)[:, None]


def test_key_images_are_the_highest_scoring_slices(series_dir, card):
    paths = _paths(series_dir)
    card16 = replace(card, preprocessing=replace(card.preprocessing, min_slices=16))
    result = analyse_ct_series(card16, list(reversed(paths)), _bright_slices, batch_size=5)
    assert result.analysed and len(result.scores) == 18
    top = np.argsort(-np.array(result.scores), kind="stable")[:3]
    sorted_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert [k.sop_instance_uid for k in result.key_images] == [sorted_uids[i] for i in top]
    assert [k.score for k in result.key_images] == sorted(result.scores, reverse=True)[:3]
    assert set(result.timings) == {"load", "preprocess", "infer", "postprocess"}
    assert result.measurements["slices"] == 18


def test_negative_study_still_names_key_images(series_dir, card):
    result = analyse_ct_series(card, _paths(series_dir), lambda x: np.full((len(x), 1), -8.0))
    assert result.analysed and result.present is False
    assert len(result.key_images) == 3 and result.certainty > 0.99


def test_a_short_series_becomes_a_not_analysed_result(series_dir, card):
    result = analyse_ct_series(card, _paths(series_dir)[:3], _bright_slices)
    assert not result.analysed and "3 slices, the ich_ct model needs at least 16" in result.reason


def test_worker_processes_give_the_same_scores_as_one_process(series_dir, card):
    paths = _paths(series_dir)
    alone = analyse_ct_series(card, paths, _bright_slices)
    with ProcessPoolExecutor(2) as pool:
        pooled = analyse_ct_series(card, paths, _bright_slices, executor=pool)
    assert np.allclose(alone.scores, pooled.scores) and alone.key_images == pooled.key_images
