"""The heatmap Segmentation: FRACTIONAL, on the slide's frame of reference, valid by dciodvfy."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from phantoms.wsi_slide import write_wsi_slide
from pipelines.model_card import load_card
from pipelines.seg_encoding import build_heatmap_seg
from pipelines.wsi_analysis import analyse_wsi_slide
from pipelines.wsi_slide import header

MODEL = Path(__file__).resolve().parents[1] / "models" / "tumor_wsi"
SERIES, SOP = "1.2.826.0.1.3680043.10.1338.9.1", "1.2.826.0.1.3680043.10.1338.9.2"


def darkness(x: np.ndarray) -> np.ndarray:
    m = x.mean(axis=(1, 2, 3))
    return np.stack([m, -m], axis=1) * 3


@pytest.fixture(scope="module")
def seg_and_source(tmp_path_factory):
    card = load_card(MODEL, verify=False)
    paths = write_wsi_slide(tmp_path_factory.mktemp("seg"), 4096, 3072, 0.3, 71)
    result = analyse_wsi_slide(card, paths, darkness)
    level = next(p for p in paths if header(p).SOPInstanceUID == result.heatmap["level_sop_instance_uid"])
    source = header(level)
    seg = build_heatmap_seg(card, result, source, SERIES, SOP, run=1)
    out = tmp_path_factory.mktemp("segout") / "seg.dcm"
    seg.save_as(out)
    return out, source, result, card


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_heatmap_seg_passes_dciodvfy(seg_and_source):
    out = seg_and_source[0]
    run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_heatmap_seg_sits_on_the_slide_at_tile_resolution(seg_and_source):
    out, source, result, card = seg_and_source
    seg = pydicom.dcmread(out)
    hm = result.heatmap
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (SERIES, SOP)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == (hm["rows"], hm["cols"])
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert float(spacing[0]) == pytest.approx(224 * 0.5 / 1000)
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == card.finding.code.value
    assert segment.SegmentAlgorithmName == card.name
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)[0][: hm["rows"], : hm["cols"]]
    values = np.clip(np.array(hm["values"]).reshape(hm["rows"], hm["cols"]), 0, 1)
    assert np.abs(pixels / 255.0 - values).max() <= 1 / 255 + 1e-6


OMITTED = ("TotalPixelMatrixOriginSequence", "ImageOrientationSlide", "OpticalPathSequence",
           "NumberOfOpticalPaths", "ContainerIdentifier", "SpecimenDescriptionSequence")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_seg_of_a_slide_that_omits_what_converters_omit_is_valid_with_documented_defaults(
        seg_and_source, tmp_path):
    """No pixel matrix origin, orientation, optical path, container or specimen (the EZ-WSI
    Camelyon export has none of them), and a de-identified patient module without a method."""
    _, source, result, card = seg_and_source
    bare = copy.deepcopy(source)  # pydicom.Dataset(source) would share the element dict
    for kw in OMITTED:
        delattr(bare, kw)
    bare.PatientIdentityRemoved = "YES"
    bare.DeidentificationMethod = ""
    seg = build_heatmap_seg(card, result, bare, SERIES, SOP, run=2)
    assert all(kw not in bare for kw in OMITTED)  # the caller's header is left as it was
    origin = seg.TotalPixelMatrixOriginSequence[0]
    assert float(origin.XOffsetInSlideCoordinateSystem) == float(origin.YOffsetInSlideCoordinateSystem) == 0
    assert [float(v) for v in seg.ImageOrientationSlide] == [0, -1, 0, -1, 0, 0]
    assert seg.ContainerIdentifier == "UNKNOWN"
    assert "not stated" in seg.DeidentificationMethod
    out = tmp_path / "seg.dcm"
    seg.save_as(out)
    run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
