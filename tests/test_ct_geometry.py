"""CT as scanners write it: a tilted gantry, mixed slice thickness and spacing, missing slices.

A tilted series is analysed after shear correction with its tilt stated; thickness and spacing
outside the card's validated range are "not analysed" with a reason that names the range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.ct_head import make_ct_phantom, tilt_geometry, write_ct_series
from pipelines.ct_series import deshear, load_ct_series
from pipelines.ct_triage import analyse_ct_series
from pipelines.findings import NotAnalysable
from pipelines.model_card import load_card

CARD_DIR = Path(__file__).resolve().parents[1] / "models" / "ich_ct"
TILT_DEG = 20.0


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR)


@pytest.fixture(scope="module")
def infer(card):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(card.model_path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run([card.output.name], {card.input.name: x})[0]


def _rewrite(paths: list[Path], out: Path, thickness: list[float], steps: list[float]) -> list[Path]:
    """The series with new SliceThickness per slice and slices `steps` mm apart along z."""
    out.mkdir(parents=True, exist_ok=True)
    z0 = float(pydicom.dcmread(paths[0], stop_before_pixels=True).ImagePositionPatient[2])
    zs = z0 + np.concatenate([[0.0], np.cumsum(steps)])
    written = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = f"{thickness[k]:g}"
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{zs[k]:.3f}"]
        ds.SliceLocation = f"{zs[k]:.3f}"
        written.append(out / path.name)
        ds.save_as(written[-1])
    return written


def test_tilted_gantry_series_is_shear_corrected_back_to_the_phantom(card, tmp_path):
    paths = write_ct_series(tmp_path, "subdural", slices=18, seed=21, gantry_tilt_deg=TILT_DEG)
    phantom = make_ct_phantom("subdural", 18, 21)
    rows_per_slice, tilt = tilt_geometry(phantom, TILT_DEG)
    assert rows_per_slice >= 2 and abs(tilt - TILT_DEG) < 5
    series = load_ct_series(paths, card.preprocessing, domain=card.validated_domain)
    assert series.tilt_deg == pytest.approx(tilt, abs=0.01)
    assert not np.array_equal(series.hu, phantom.hu)  # as stored: each slice lower than the last
    upright = deshear(series.hu, series.inplane_offsets_mm, series.pixel_spacing, fill=-1024)
    kept = 512 - rows_per_slice * 17  # rows the lowest slice still holds
    assert np.array_equal(upright[:, :kept], phantom.hu[:, :kept])


def test_tilted_series_is_analysed_with_its_geometry_stated(card, infer, tmp_path):
    tilted = analyse_ct_series(card, write_ct_series(tmp_path / "tilted", "subdural", slices=18, seed=21,
                                                     gantry_tilt_deg=TILT_DEG), infer)
    upright = analyse_ct_series(card, write_ct_series(tmp_path / "upright", "subdural", slices=18, seed=21),
                                infer)
    assert tilted.analysed and upright.analysed, (tilted.reason, upright.reason)
    assert tilted.measurements["gantry_tilt_deg"] == pytest.approx(17.46, abs=0.05)
    assert upright.measurements["gantry_tilt_deg"] == 0
    assert tilted.present is upright.present is True
    assert abs(tilted.score - upright.score) < 0.05


def test_thicker_slices_in_part_of_the_series_are_refused_naming_the_validated_range(card, infer, tmp_path):
    """As the GE head CT does: 4 mm slices through the skull base, 7 mm above."""
    paths = write_ct_series(tmp_path / "src", "none", slices=28, seed=31)
    mixed = _rewrite(paths, tmp_path / "mixed", [4.0] * 14 + [7.0] * 14, [4.0] * 14 + [7.0] * 13)
    result = analyse_ct_series(card, mixed, infer)
    assert not result.analysed
    assert "outside the ich_ct model's validated domain (slice thickness 7 mm in slices 15-28 of 28; " \
           "validated 2.5-5 mm)" in result.reason


def test_slice_spacing_is_judged_run_by_run_against_the_validated_range(card, infer, tmp_path):
    """2.5 mm then 5 mm: both validated, analysed. 5 mm then 6.5 mm: refused, naming the range.
    Two missing slices in a row: a gap, said as such."""
    paths = write_ct_series(tmp_path / "src", "none", slices=20, seed=32)
    mixed = _rewrite(paths, tmp_path / "mixed", [2.5] * 10 + [5.0] * 10, [2.5] * 10 + [5.0] * 9)
    result = analyse_ct_series(card, mixed, infer)
    assert result.analysed, result.reason

    wide = _rewrite(paths, tmp_path / "wide", [5.0] * 20, [5.0] * 8 + [6.5] * 11)
    result = analyse_ct_series(card, wide, infer)
    assert not result.analysed
    assert "(slice spacing 6.5 mm between slices 9-20 of 20; validated 0.5-5 mm)" in result.reason

    with pytest.raises(NotAnalysable, match=r"mm gap between slices at .*slices are missing"):
        load_ct_series(paths[:9] + paths[11:], card.preprocessing, domain=card.validated_domain)
