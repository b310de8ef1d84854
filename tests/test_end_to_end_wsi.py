"""Whole-slide images end to end: DCMTK storescu -> the running node -> DCMTK storescp as the PACS.

One node and one PACS serve this module. A tumor slide and a normal slide come back as an AIR SR
plus a FRACTIONAL heatmap SEG each; a slide without tissue comes back as a "not analysed" SR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import pytest

from phantoms.wsi_slide import BASE_SPACING_UM, tumor_mask, write_wsi_slide
from pipelines.sr_reading import read_result_sr
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import poll
from tests.pacs_results import results_for_study
from tests.validators import dciodvfy_errors, dsrdump_ok

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

W, H = 6144, 4608
TUMOR = 0.4
PROPOSE_JPEG = ("-xy",)  # storescu would otherwise try to decompress JPEG baseline, and fail


def wait_for(pacs, study_uid, modality, timeout=90):
    return poll(lambda: results_for_study(pacs.directory, study_uid, modality), timeout, 0.25,
                f"{modality} for study {study_uid} at the PACS")


def send_slide(node, folder: Path, **kwargs) -> tuple[list[Path], pydicom.Dataset]:
    paths = write_wsi_slide(folder, **kwargs)
    result = run_storescu(paths, ae="SCANNER", port=node.dicom_port, timeout=120,
                          extra_args=PROPOSE_JPEG)
    assert result.returncode == 0, result.output
    return paths, pydicom.dcmread(paths[0], stop_before_pixels=True)


def seg_grid(seg: pydicom.Dataset) -> np.ndarray:
    """The SEG's fractional values (0..1) as the (rows, cols) tile grid."""
    rows, cols = int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    ntx = -(-cols // seg.Columns)
    full = np.zeros((-(-rows // seg.Rows) * seg.Rows, ntx * seg.Columns), np.float32)
    for i, frame in enumerate(frames):  # TILED_FULL: frames row by row
        ty, tx = divmod(i, ntx)
        full[ty * seg.Rows:(ty + 1) * seg.Rows, tx * seg.Columns:(tx + 1) * seg.Columns] = frame
    return full[:rows, :cols] / float(seg.get("MaximumFractionalValue", 255))


@pytest.mark.parametrize("tumor,seed,present", [(TUMOR, 9301, True), (0.0, 9302, False)])
def test_slide_comes_back_as_sr_and_fractional_heatmap_seg(node, pacs, tmp_path, tumor, seed, present):
    paths, source = send_slide(node, tmp_path / f"slide-{seed}", width=W, height=H, tumor=tumor,
                               seed=seed)
    study_uid = source.StudyInstanceUID
    [sr] = wait_for(pacs, study_uid, "SR")
    [seg] = wait_for(pacs, study_uid, "SEG")

    info = read_result_sr(sr)
    assert info["present"] is present, info
    assert 0.5 <= info["certainty"] <= 1.0
    assert info["algorithm"]["name"] == "tumor_wsi"
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert set(info["referenced_sop_instance_uids"]) <= sent
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert dciodvfy_errors(sr.filename) == []
    assert dsrdump_ok(sr.filename)

    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence}
    assert refs and refs <= sent
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert dciodvfy_errors(seg.filename) == []

    grid = seg_grid(seg)
    spacing_mm = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    cell = spacing_mm * 1000 / BASE_SPACING_UM  # one heatmap cell in base pixels
    truth = tumor_mask(W, H, tumor, seed, grid.shape, cell_size=cell)
    pred = grid >= 0.5
    if present:
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        print(f"Dice through the node: {dice:.3f} on a {grid.shape} grid")
        assert dice >= 0.7, f"Dice {dice:.3f}"
    else:
        assert not truth.any() and pred.mean() < 0.05

    study = node.wait_study_state(study_uid, {"delivered"})
    assert study["present"] is present and study["model"] == "tumor_wsi"
    [job] = study["jobs"]
    assert job["measurements"]["tiles_analysed"] > 0
    assert 0 < job["measurements"]["tissue_fraction"] <= 1
    for stage in ("tissue", "decode", "infer"):
        assert job["timings"][stage] > 0, (stage, job["timings"])
    metrics = poll(lambda: (lambda r: r[1] if r[0] == 200 and "befund_wsi_tiles_analysed_total{" in r[1]
                            else None)(node.api("/metrics", token=None)), 30, 0.25, "/metrics")
    tiles = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("befund_wsi_tiles_analysed_total{")]
    assert sum(tiles) >= job["measurements"]["tiles_analysed"]
    assert "befund_wsi_tissue_fraction" in metrics


def test_slide_without_tissue_comes_back_as_not_analysed_with_reason(node, pacs, tmp_path):
    _, source = send_slide(node, tmp_path / "blank", width=W, height=H, tumor=0.0, seed=9303,
                           tissue=False)
    study_uid = source.StudyInstanceUID
    [sr] = wait_for(pacs, study_uid, "SR")
    info = read_result_sr(sr)
    assert info["present"] is None
    assert "no tissue" in info["not_analysed_reason"]
    assert dciodvfy_errors(sr.filename) == []
    study = node.wait_study_state(study_uid, {"not analysed"})
    assert "no tissue" in study["reason"]
    assert results_for_study(pacs.directory, study_uid, "SEG") == []

