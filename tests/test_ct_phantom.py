"""The head-CT phantom: deterministic, realistic HU, valid DICOM in every transfer syntax."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from phantoms.ct_head import FINDINGS, TRANSFER_SYNTAXES, make_ct_phantom, make_ct_series, write_ct_series
from phantoms.dicom_encoding import transfer_syntax_uid


def test_same_seed_gives_the_same_series_and_another_seed_a_different_patient():
    a = make_ct_series("subdural", slices=4, seed=11)
    b = make_ct_series("subdural", slices=4, seed=11)
    c = make_ct_series("subdural", slices=4, seed=12)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert all(x.PixelData == y.PixelData for x, y in zip(a, b, strict=True))
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert a[0].PatientName != c[0].PatientName
    assert not np.array_equal(a[2].pixel_array, c[2].pixel_array)


def test_tissues_have_realistic_hounsfield_units():
    ph = make_ct_phantom("none", slices=12, seed=4)
    hu = ph.hu
    assert hu.dtype == np.int16 and hu.shape == (12, 512, 512)
    assert abs(np.median(hu[:, :8, :8]) + 1000) < 15  # air in the corner
    brain = hu[(hu > -20) & (hu < 60)]
    assert 20 < np.median(brain) < 45  # grey and white matter
    assert hu.max() > 700  # skull
    assert 0 < np.mean((hu > 650) & (hu < 2100)) < 0.2
    for seed in range(3):
        assert not make_ct_phantom("none", 24, seed).slice_labels.any()


@pytest.mark.parametrize("finding", FINDINGS[1:])
def test_every_bleed_type_spans_several_but_not_all_slices_in_acute_blood_range(finding):
    for seed in (1, 2):
        ph = make_ct_phantom(finding, slices=20, seed=seed)
        visible = ph.slice_labels
        assert 2 <= visible.sum() < len(visible), (finding, seed, ph.bleed_area_mm2)
        # blood-range voxels (50-90 HU) are clearly more common on bleed slices than on normal ones
        normal = make_ct_phantom("none", slices=20, seed=seed)
        k = int(np.argmax(ph.bleed_area_mm2))
        blood = lambda v: np.count_nonzero((v > 50) & (v < 95))  # noqa: E731
        assert blood(ph.hu[k]) > blood(normal.hu[k]) + 100


def test_calcifications_appear_in_normal_studies_and_are_brighter_than_blood():
    calcified = 0
    for seed in range(6):
        ph = make_ct_phantom("none", slices=16, seed=seed)
        assert not ph.slice_labels.any()
        if ph.calcification_area_mm2.max() > 3:
            calcified += 1
            k = int(np.argmax(ph.calcification_area_mm2))
            assert np.count_nonzero((ph.hu[k] > 150) & (ph.hu[k] < 600)) > 5
    assert calcified >= 4


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
def test_every_transfer_syntax_round_trips_through_pydicom(tmp_path, syntax):
    ph = make_ct_phantom("epidural", slices=3, seed=9)
    paths = write_ct_series(tmp_path, "epidural", slices=3, seed=9, transfer_syntax=syntax)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax_uid(syntax)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, ph.hu[k])


def test_series_headers_are_consistent():
    series = make_ct_series("none", slices=5, seed=3, patient_name="TEST^NAME", study_uid="1.2.3.4")
    z = [float(d.ImagePositionPatient[2]) for d in series]
    spacing = np.diff(z)
    assert np.allclose(spacing, spacing[0]) and spacing[0] > 0
    assert [d.InstanceNumber for d in series] == [1, 2, 3, 4, 5]
    assert len({d.SOPInstanceUID for d in series}) == 5
    for d in series:
        assert d.SOPClassUID == CTImageStorage and d.Modality == "CT" and d.BodyPartExamined == "HEAD"
        assert d.StudyInstanceUID == "1.2.3.4" and str(d.PatientName) == "TEST^NAME"
        assert d.Rows == d.Columns == 512 and d.RescaleIntercept == -1024
        assert 2.5 <= float(d.SliceThickness) <= 5
        assert d.SeriesInstanceUID == series[0].SeriesInstanceUID
        assert d.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert str(make_ct_series("none", slices=1, seed=3)[0].PatientName) == "PHANTOM^CT-3"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
def test_dciodvfy_finds_no_errors(tmp_path, syntax):
    path = write_ct_series(tmp_path, "subarachnoid", slices=2, seed=5, transfer_syntax=syntax)[0]
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "Error" not in report, report
    assert "Warning" not in report, report


@pytest.mark.skipif(shutil.which("dcmdjpeg") is None, reason="DCMTK not installed")
@pytest.mark.parametrize(("syntax", "tool"), [("jpeg-lossless", "dcmdjpeg"), ("rle", "dcmdrle")])
def test_dcmtk_decodes_compressed_phantoms_bit_exactly(tmp_path, syntax, tool):
    path = write_ct_series(tmp_path / "in", "intraparenchymal", slices=1, seed=2, transfer_syntax=syntax)[0]
    out = tmp_path / "out.dcm"
    subprocess.run([tool, str(path), str(out)], check=True, capture_output=True, timeout=60)
    assert np.array_equal(pydicom.dcmread(out).pixel_array, pydicom.dcmread(path).pixel_array)


def test_three_hundred_slices_are_written_quickly(tmp_path):
    import time

    t0 = time.perf_counter()
    paths = write_ct_series(tmp_path, "subdural", slices=300, seed=1)
    assert len(paths) == 300
    assert time.perf_counter() - t0 < 45


@pytest.mark.parametrize("finding", FINDINGS)
def test_bleed_mask_is_the_painted_blood_and_matches_the_slice_areas(finding):
    ph = make_ct_phantom(finding, slices=16, seed=5)
    assert ph.bleed_mask.shape == ph.hu.shape and ph.bleed_mask.dtype == bool
    area = ph.bleed_mask.sum(axis=(1, 2)) * ph.pixel_spacing_mm ** 2
    np.testing.assert_allclose(area, ph.bleed_area_mm2)
    if finding == "none":
        assert not ph.bleed_mask.any()
    else:
        assert 45 < np.median(ph.hu[ph.bleed_mask]) < 100  # acute blood, with scanner noise
