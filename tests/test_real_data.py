"""Real scans through the running node: every series of ../shared/realdata gets the outcome its
README names, and every SR and SEG the node writes passes dciodvfy.

The data is read where it lies (PROJECT/../shared/realdata), never copied into the project.
DCMTK's dcmsend sends the folder as a user would (each file proposed in its own transfer
syntax, one association; the JPEG 2000 slide first on its own, its label first); the
TILED_SPARSE forms and a LABEL on its own are also sent as
series of their own (copies with new UIDs, written to a temporary folder) so that their
verdicts can be compared with the TILED_FULL slide's.

| data | expected |
|---|---|
| ct/ge_head_tilted (4 mm + 7 mm, tilt 18.5 deg) | not analysed: slice thickness 7 mm outside 2.5-5 mm |
| wsi/cmu1_jpeg (+ the sparse files, same series) | analysed: SR + SEG, heatmap on the tissue |
| wsi/cmu1_j2k | analysed: the same verdict as the JPEG form |
| wsi/cmu1_sparse (as series of their own) | analysed: the same verdict |
| wsi/camelyon_29um | not analysed: 29 um/px, far coarser than the model's 0.5 um/px |
| a LABEL instance alone | not analysed, no SR |
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipelines.sr_reading import read_result_sr
from tests.node_harness import PROJECT, poll
from tests.pacs_results import results_for_study
from tests.validators import dciodvfy_errors

REALDATA = (PROJECT / ".." / "shared" / "realdata").resolve()
pytestmark = [
    pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real data folder {REALDATA} is absent"),
    pytest.mark.skipif(shutil.which("dcmsend") is None, reason="DCMTK dcmsend is not installed"),
]


def _uids(folder: str) -> tuple[str, str]:
    """(study, series) UID of the first image in a realdata folder."""
    first = sorted((REALDATA / folder).glob("*.dcm"))[0]
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _dcmsend(node, *paths: Path) -> None:
    proc = subprocess.run(
        ["dcmsend", "-aet", "REALDATA", "-aec", "BEFUND", "+sd", "+r", "+sp", "*.dcm", "-nh",
         "127.0.0.1", str(node.dicom_port), *map(str, paths)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _as_own_series(src: Path, out: Path) -> Path:
    """A copy of `src` in a study and series of its own (same pixels, new UIDs)."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["befund-realdata-study", src.name])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["befund-realdata-series", src.name])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["befund-realdata-sop", src.name])
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(out / src.name, enforce_file_format=True)
    return out / src.name


@pytest.fixture(scope="module")
def sent(node, tmp_path_factory):
    """Send realdata as it lies, then the sparse forms and a label as series of their own."""
    own = tmp_path_factory.mktemp("own-series")
    extra = {
        "sparse": _as_own_series(REALDATA / "wsi/cmu1_sparse/level0_TILED_SPARSE.dcm", own / "sparse"),
        "sparse_all": _as_own_series(REALDATA / "wsi/cmu1_sparse/level0_TILED_SPARSE_alltiles.dcm",
                                     own / "sparse_all"),
        "label": _as_own_series(REALDATA / "wsi/cmu1_jpeg/label.dcm", own / "label"),
    }
    # the JPEG 2000 form label first (directory order is the file system's): the label must
    # not make the slide's series look like a label to routing
    j2k = sorted((REALDATA / "wsi/cmu1_j2k").glob("*.dcm"), key=lambda p: p.name != "label.dcm")
    _dcmsend(node, *j2k)
    _dcmsend(node, REALDATA)  # the j2k instances again: known, they start no new run
    _dcmsend(node, own)
    studies = {
        "ct": _uids("ct/ge_head_tilted")[0],
        "jpeg": _uids("wsi/cmu1_jpeg")[0],
        "j2k": _uids("wsi/cmu1_j2k")[0],
        "camelyon": _uids("wsi/camelyon_29um")[0],
        **{k: str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for k, p in extra.items()},
    }
    finished = {"delivered", "not analysed", "delivery failed"}
    rows = {k: node.wait_study_state(uid, finished, timeout=180) for k, uid in studies.items()}
    return studies, rows


def _objects(pacs, study_uid: str, modality: str, expected: int) -> list[pydicom.Dataset]:
    return poll(lambda: (lambda found: found if len(found) >= expected else None)(
        results_for_study(pacs.directory, study_uid, modality)), 60, 0.25,
        f"{expected} {modality} for study {study_uid} at the PACS")


def _valid(ds: pydicom.Dataset) -> None:
    errors = dciodvfy_errors(ds.filename)
    assert errors == [], f"{ds.Modality} {ds.SOPInstanceUID}: {errors}"


def test_gantry_tilted_ge_head_ct_is_not_analysed_with_the_validated_thickness_named(sent, pacs):
    studies, rows = sent
    row = rows["ct"]
    assert row["state"] == "not analysed", row
    assert "slice thickness 7 mm in slices 15-28 of 28" in row["reason"]
    assert "validated 2.5-5 mm" in row["reason"]
    [sr] = _objects(pacs, studies["ct"], "SR", 1)
    info = read_result_sr(sr)
    assert info["present"] is None and "validated 2.5-5 mm" in info["not_analysed_reason"]
    _valid(sr)  # its source says PatientIdentityRemoved YES with no DeidentificationMethod


def test_cmu1_slide_is_analysed_with_the_same_verdict_in_every_form(sent, pacs):
    studies, rows = sent
    verdicts = {}
    for form in ("jpeg", "j2k", "sparse", "sparse_all"):
        row = rows[form]
        assert row["state"] == "delivered", (form, row)
        assert row["model"] == "tumor_wsi" and row["present"] is not None, (form, row)
        [sr] = _objects(pacs, studies[form], "SR", 1)
        [seg] = _objects(pacs, studies[form], "SEG", 1)
        assert read_result_sr(sr)["present"] is row["present"]
        _valid(sr)
        _valid(seg)
        verdicts[form] = row["present"]
    assert len(set(verdicts.values())) == 1, verdicts


def _seg_grid(seg: pydicom.Dataset) -> np.ndarray:
    """The SEG's fractional values (0..1) as its (rows, cols) tile grid (TILED_FULL)."""
    rows, cols = int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    ntx = -(-cols // seg.Columns)
    full = np.zeros((-(-rows // seg.Rows) * seg.Rows, ntx * seg.Columns), np.float32)
    for i, frame in enumerate(frames):
        ty, tx = divmod(i, ntx)
        full[ty * seg.Rows:(ty + 1) * seg.Rows, tx * seg.Columns:(tx + 1) * seg.Columns] = frame
    return full[:rows, :cols] / float(seg.get("MaximumFractionalValue", 255))


def test_cmu1_heatmap_seg_lies_on_the_tissue(sent, pacs):
    """The SEG's cells that carry a probability are the slide's tissue, at the slide's origin."""
    from pipelines.wsi_slide import open_slide, read_level_image

    studies, _ = sent
    [seg] = _objects(pacs, studies["jpeg"], "SEG", 1)
    slide = open_slide(sorted((REALDATA / "wsi/cmu1_jpeg").glob("level*.dcm")))
    source = pydicom.dcmread(slide.levels[0].path, stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for axis in ("XOffsetInSlideCoordinateSystem", "YOffsetInSlideCoordinateSystem"):
        assert float(seg.TotalPixelMatrixOriginSequence[0].get(axis)) == \
            pytest.approx(float(source.TotalPixelMatrixOriginSequence[0].get(axis)))
    assert [float(v) for v in seg.ImageOrientationSlide] == [float(v) for v in source.ImageOrientationSlide]
    cell_mm = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    grid = _seg_grid(seg)
    base = slide.levels[0]
    assert grid.shape[0] * cell_mm * 1000 == pytest.approx(base.rows * base.spacing_um, abs=cell_mm * 1000)
    assert grid.shape[1] * cell_mm * 1000 == pytest.approx(base.cols * base.spacing_um, abs=cell_mm * 1000)

    # tissue per cell, independently: saturated pixels on the 2 um/px level
    level = min(slide.levels, key=lambda lv: abs(lv.spacing_um - 2.0))
    rgb = read_level_image(level).astype(np.int16)
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 20
    step = cell_mm * 1000 / level.spacing_um
    tissue = np.zeros(grid.shape)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            block = saturated[int(r * step):int((r + 1) * step), int(c * step):int((c + 1) * step)]
            tissue[r, c] = block.mean() if block.size else 0.0
    marked = grid > 0
    assert marked.sum() >= 20
    assert tissue[marked].mean() > 0.5, "cells with a probability should lie on tissue"
    assert tissue[~marked].mean() < 0.25, "cells without one should be glass"
    iou = (marked & (tissue > 0.4)).sum() / (marked | (tissue > 0.4)).sum()
    assert iou >= 0.6, iou


def test_camelyon_slide_at_29_um_is_not_analysed_with_the_reason(sent, pacs):
    studies, rows = sent
    row = rows["camelyon"]
    assert row["state"] == "not analysed", row
    assert "29 um/px" in row["reason"] and "0.5 um/px" in row["reason"]
    [sr] = _objects(pacs, studies["camelyon"], "SR", 1)
    assert read_result_sr(sr)["present"] is None
    _valid(sr)
    assert results_for_study(pacs.directory, studies["camelyon"], "SEG") == []


def test_a_label_on_its_own_is_not_analysed_and_gets_no_sr(sent, pacs):
    studies, rows = sent
    row = rows["label"]
    assert row["state"] == "not analysed" and "LABEL" in row["reason"], row
    assert results_for_study(pacs.directory, studies["label"], "SR") == []


def test_every_real_series_was_routed_and_finished(sent, node):
    """Each series in realdata is known to the node and ended in one of the outcomes above:
    none waits, runs or failed to deliver."""
    studies, _ = sent
    wanted = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
              for p in REALDATA.rglob("*.dcm")}
    seen = {}
    for uid in set(studies.values()):
        detail = node.study(uid)
        assert detail["state"] in ("delivered", "not analysed"), (uid, detail["state"], detail["reason"])
        seen.update({s["series_uid"]: s["state"] for s in detail["series"]})
    assert wanted <= set(seen), wanted - set(seen)
    assert all(state in ("routed", "no_model") for state in seen.values()), seen


# --- without the node: the real frames themselves ---------------------------------------------


def test_real_jfif_frames_declared_rgb_decode_to_the_colours_of_the_level_above():
    """cmu1_jpeg's smallest level was re-encoded by the converter: YCbCr with a JFIF marker,
    declared RGB. Read per the markers it matches the level above it, pooled 2x; read as the
    header says (no YCbCr conversion) it would not."""
    import imagecodecs

    from pipelines.wsi_slide import jpeg_colour_space, open_slide, read_level_image

    slide = open_slide(sorted((REALDATA / "wsi/cmu1_jpeg").glob("level*.dcm")))
    small, above = slide.levels[-1], slide.levels[-2]
    assert small.photometric == "RGB"
    with open(small.path, "rb") as fp:
        fp.seek(int(small.frame_offsets[0]))
        frame = fp.read(int(small.frame_lengths[0]))
    assert jpeg_colour_space(frame) == "YCbCr"
    ours = read_level_image(small).astype(np.float32)
    pooled = read_level_image(above).astype(np.float32)
    h, w = min(ours.shape[0], pooled.shape[0] // 2), min(ours.shape[1], pooled.shape[1] // 2)
    pooled = pooled[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    as_declared = imagecodecs.jpeg8_decode(frame, colorspace="RGB", outcolorspace="RGB")[:h, :w]
    assert np.abs(ours[:h, :w] - pooled).mean() < 8
    assert np.abs(as_declared.astype(np.float32) - pooled).mean() > 20
