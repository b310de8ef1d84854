"""The whole-slide phantom: deterministic, a proper pyramid, and valid DICOM by dciodvfy."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.wsi_slide import pyramid_sizes, tissue_mask, tumor_mask, write_wsi_slide

W, H = 4096, 3072
DCIODVFY = shutil.which("dciodvfy")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi")
    return write_wsi_slide(out, W, H, tumor=0.3, seed=11, label=True, overview=True)


def test_same_seed_writes_the_same_bytes_in_another_process(slide, tmp_path):
    subprocess.run([sys.executable, "-m", "phantoms.wsi_slide", str(tmp_path), "--width", str(W),
                    "--height", str(H), "--tumor", "0.3", "--seed", "11"], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    again = sorted(tmp_path.glob("*.dcm"))
    assert [p.name for p in again] == sorted(p.name for p in slide)
    assert [_digest(p) for p in again] == [_digest(p) for p in sorted(slide)]


def test_pyramid_levels_share_series_and_frame_of_reference(slide):
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slide]
    assert {h.SeriesInstanceUID for h in headers} == {headers[0].SeriesInstanceUID}
    assert {h.FrameOfReferenceUID for h in headers} == {headers[0].FrameOfReferenceUID}
    assert {h.SOPClassUID for h in headers} == {"1.2.840.10008.5.1.4.1.1.77.1.6"}
    assert headers[0].PatientName == "PHANTOM^WSI-11" and headers[0].Modality == "SM"
    volume = [h for h in headers if h.ImageType[2] == "VOLUME"]
    assert [(h.TotalPixelMatrixColumns, h.TotalPixelMatrixRows) for h in volume] == pyramid_sizes(W, H)
    assert max(volume[-1].TotalPixelMatrixColumns, volume[-1].TotalPixelMatrixRows) <= 2048
    spacing = [float(h.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
               for h in volume]
    assert spacing == pytest.approx([0.00025 * 2**i for i in range(len(volume))])
    assert volume[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert volume[0].PhotometricInterpretation == "YBR_FULL_422"
    assert {h.ImageType[2] for h in headers} == {"VOLUME", "LABEL", "OVERVIEW"}


def test_truth_masks_put_tumor_inside_tissue():
    shape = (96, 128)
    tissue = tissue_mask(W, H, 11, shape)
    tumor = tumor_mask(W, H, 0.3, 11, shape)
    assert 0.05 < tissue.mean() < 0.6
    assert tumor.any() and not (tumor & ~tissue).any()
    assert 0.15 < tumor.sum() / tissue.sum() < 0.45
    assert not tumor_mask(W, H, 0.0, 11, shape).any()
    assert np.array_equal(tumor, tumor_mask(W, H, 0.3, 11, shape))


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("variant", [
    {},
    {"tiling": "sparse", "offset_table": "none"},
    {"codec": "jpeg2000", "offset_table": "extended"},
])
def test_every_instance_passes_dciodvfy(slide, tmp_path, variant):
    paths = slide if not variant else write_wsi_slide(tmp_path, W, H, tumor=0.2, seed=12, **variant)
    for path in paths:
        run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
