"""Key images are tested for what they show: size, the finding's outline where the finding is,
the caption (window, slice) and, for slides, the colour bar."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from phantoms.ct_head import write_ct_series
from pipelines.key_images import (
    CAPTION_BG,
    MIN_SIZE,
    OUTLINE_RGB,
    render_ct_key_image,
    render_slide_key_image,
    slice_label,
    window_label,
)
from pipelines.thumbnails import _RAMP_RGB


def _rgb(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _head(bleed: bool) -> np.ndarray:
    yy, xx = np.mgrid[-128:128, -128:128]
    hu = np.full((256, 256), -1000.0)
    hu[xx**2 + (yy / 1.2) ** 2 < 110**2] = 800.0  # skull
    hu[xx**2 + (yy / 1.2) ** 2 < 100**2] = 35.0  # brain
    if bleed:
        hu[(xx - 30) ** 2 + (yy + 20) ** 2 < 15**2] = 70.0
    return hu


def _is(rgb: np.ndarray, colour) -> np.ndarray:
    return np.all(rgb == np.array(colour, dtype=np.uint8), axis=-1)


def test_ct_key_image_is_512_px_outlines_the_bleed_where_it_is_and_names_window_and_slice():
    png = render_ct_key_image(_head(bleed=True), (40, 80), slice_label(12, 24, 30.0), score=0.93)
    rgb = _rgb(png)
    assert rgb.shape[1] >= MIN_SIZE and rgb.shape[0] > MIN_SIZE  # image plus caption below
    outline = _is(rgb[:MIN_SIZE], OUTLINE_RGB)
    ys, xs = np.nonzero(outline)
    assert len(ys) > 100
    scale = MIN_SIZE / 256  # the bleed: centre (128+30, 128-20), radius 15 px in the slice
    assert abs(xs.mean() / scale - 158) < 4 and abs(ys.mean() / scale - 108) < 4
    assert (xs.max() - xs.min()) / scale < 34  # the bleed's outline, not the head's
    caption = rgb[MIN_SIZE:]
    assert (caption.sum(axis=-1) > 500).sum() > 200  # caption text drawn
    assert _is(caption, OUTLINE_RGB).sum() > 20  # the legend's outline swatch
    assert window_label((40, 80)) == "brain W80/L40"
    assert slice_label(12, 24, 30.0) == "slice 12 of 24, z = 30.0 mm"


def test_ct_key_image_of_a_slice_without_blood_draws_no_outline_and_a_mask_is_outlined():
    rgb = _rgb(render_ct_key_image(_head(bleed=False), (40, 80), "slice 1 of 2"))
    assert _is(rgb[:MIN_SIZE], OUTLINE_RGB).sum() == 0
    mask = np.zeros((256, 256), dtype=bool)
    mask[40:80, 40:80] = True
    rgb = _rgb(render_ct_key_image(_head(bleed=False), (40, 80), "slice 1 of 2", mask=mask))
    ys, xs = np.nonzero(_is(rgb[:MIN_SIZE], OUTLINE_RGB))
    assert len(ys) > 100 and xs.min() >= 78 and xs.max() <= 162


def test_ct_key_image_of_a_phantom_bleed_slice(tmp_path):
    import pydicom

    files = write_ct_series(tmp_path, finding="subdural", slices=24, seed=5)
    hu = None
    for path in files[8:16]:
        ds = pydicom.dcmread(path)
        candidate = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if ((candidate > 55) & (candidate < 90)).sum() > 200:
            hu = candidate
            break
    assert hu is not None
    rgb = _rgb(render_ct_key_image(hu, (40, 80), "slice 12 of 24"))
    assert _is(rgb[:MIN_SIZE], OUTLINE_RGB).sum() > 50


def test_slide_key_image_has_the_colour_bar_and_outlines_tiles_above_threshold():
    thumb = np.full((300, 400, 3), 235, dtype=np.uint8)
    heat = np.full((6, 8), 0.1)
    heat[1:3, 2:4] = 0.95
    heat[5, :] = np.nan  # outside tissue
    rgb = _rgb(render_slide_key_image(thumb, heat, threshold=0.5))
    assert rgb.shape[1] >= MIN_SIZE
    image_h = round(300 * MIN_SIZE / 400)
    ys, xs = np.nonzero(_is(rgb[:image_h], OUTLINE_RGB))
    tile = MIN_SIZE / 8
    assert len(ys) > 100 and xs.min() >= 2 * tile - 2 and xs.max() <= 4 * tile + 2
    caption = rgb[image_h:]
    for colour in (_RAMP_RGB[0], _RAMP_RGB[-1]):  # both ends of the ramp in the colour bar
        near = np.abs(caption.astype(int) - colour.astype(int)).sum(axis=-1) < 12
        assert near.sum() > 50
    assert not _is(caption, CAPTION_BG).all()


def _near(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=pixels)


def test_a_segmentation_mask_is_outlined_along_its_boundary_and_nowhere_else():
    from scipy import ndimage

    yy, xx = np.mgrid[0:256, 0:256]
    mask = ((xx - 150) ** 2 + (yy - 110) ** 2 < 20**2) | ((xx >= 60) & (xx < 90) & (yy >= 170) & (yy < 185))
    rgb = _rgb(render_ct_key_image(_head(bleed=False), (40, 80), "slice 3 of 9", mask=mask,
                                   notes=["Intracranial hemorrhage 12.3 mL in the series"],
                                   outline_label="outline: ich_seg mask"))
    outline = _is(rgb[:MIN_SIZE], OUTLINE_RGB)
    big = np.kron(mask, np.ones((2, 2), dtype=bool))  # the mask on the 512 px image
    boundary = big & ~ndimage.binary_erosion(big)
    assert outline.sum() > 200
    assert not (outline & ~_near(boundary, 3)).any()  # nothing outlined off the boundary
    assert (boundary & _near(outline, 1)).sum() / boundary.sum() > 0.98  # the whole boundary, both regions
    assert (outline & ~big).sum() == 0  # drawn inside the mask: the edge pixels stay visible
    caption = rgb[MIN_SIZE:]
    assert (caption.sum(axis=-1) > 500).sum() > 400  # window/slice line, the volume line, legend


def test_the_segmentation_task_draws_its_mask_on_the_key_slice(tmp_path):
    """The ct-segmentation task: the key slice read from its file, the slice's mask decoded
    from the stored result's runs and outlined; the caption's area and volume from the result."""
    import pydicom

    from phantoms.ct_head import make_ct_phantom, series_from_phantom
    from pipelines.ct_volume import mask_to_runs
    from pipelines.tasks import task_named

    ph = make_ct_phantom("intraparenchymal", 16, 7)
    k = int(np.argmax(ph.bleed_mask.sum(axis=(1, 2))))
    instances = []
    for i, ds in enumerate(series_from_phantom(ph)):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        instances.append({"sop_instance_uid": ds.SOPInstanceUID, "path": str(tmp_path / f"{i}.dcm")})
    uid = instances[k]["sop_instance_uid"]
    result = {"present": True, "finding": {"meaning": "Intracranial hemorrhage"},
              "measurements": {"volume_ml": 12.3, "pixel_spacing_mm": ph.pixel_spacing_mm},
              "key_images": [{"sop_instance_uid": uid, "score": 0.97},
                             {"sop_instance_uid": instances[0]["sop_instance_uid"], "score": 0.1}],
              "segmentation": {"rows": 512, "columns": 512,
                               "slices": [{"sop_instance_uid": uid, "runs": mask_to_runs(ph.bleed_mask[k])}]}}
    task = task_named("ct-segmentation")
    rgb = _rgb(task.render_key_image(None, result, 0, instances))
    assert rgb.shape[1] >= MIN_SIZE
    outline = _is(rgb[:MIN_SIZE], OUTLINE_RGB)
    assert outline.sum() > 50 and not (outline & ~_near(ph.bleed_mask[k], 2)).any()
    assert _is(_rgb(task.render_key_image(None, result, 1, instances))[:MIN_SIZE], OUTLINE_RGB).sum() == 0
    assert task.render_key_image(None, result, 2, instances) is None
    area = ph.bleed_mask[k].sum() * ph.pixel_spacing_mm ** 2 / 100
    [label, _] = task.key_image_labels(None, result, [r["sop_instance_uid"] for r in instances])
    assert label.endswith(f"{area:.1f} cm\u00b2 segmented") and f"slice {k + 1} of 16" in label
    assert pydicom.dcmread(instances[k]["path"]).Rows == 512
