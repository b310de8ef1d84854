"""Tissue detection finds the phantom's known tissue and leaves pen marks out."""

from __future__ import annotations

import numpy as np
import pytest

from phantoms.wsi_slide import slide_fields, tissue_mask, write_wsi_slide
from pipelines.tissue import detect_tissue
from pipelines.wsi_slide import open_slide, read_level_image

W, H = 4096, 3072


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("seed", [31])
def test_detected_tissue_matches_the_known_tissue(tmp_path, seed):
    slide = open_slide(write_wsi_slide(tmp_path, W, H, 0.3, seed))
    thumb = slide.thumbnail_level
    found = detect_tissue(read_level_image(thumb), thumb.spacing_um)
    truth = tissue_mask(W, H, seed, found.mask.shape, cell_size=found.spacing_um / 0.25)
    assert found.method == "saturation"
    assert _dice(found.mask, truth) >= 0.9
    # the pen mark is strongly saturated but not tissue
    f = slide_fields(W, H, 0.3, seed)
    ys = (np.arange(found.mask.shape[0]) + 0.5) * found.spacing_um / 0.25 / f.cell - 0.5
    xs = (np.arange(found.mask.shape[1]) + 0.5) * found.spacing_um / 0.25 / f.cell - 0.5
    from scipy import ndimage

    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    pen = ndimage.map_coordinates(f.pen, [yy.ravel(), xx.ravel()], order=1).reshape(yy.shape) > 0.2
    assert pen.sum() > 100
    assert found.mask[pen].mean() < 0.05
    assert found.ink_fraction > 0


def test_blank_slide_has_no_tissue(tmp_path):
    slide = open_slide(write_wsi_slide(tmp_path, 4096, 3072, 0.0, 33, tissue=False))
    thumb = slide.thumbnail_level
    found = detect_tissue(read_level_image(thumb), thumb.spacing_um)
    assert found.fraction < 0.001


def test_tile_kept_when_its_centre_lies_in_tissue():
    from pipelines.tissue import TissueMask

    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    tm = TissueMask(mask, spacing_um=10.0, method="saturation")
    assert tm.keep(35, 35) and not tm.keep(55, 35)
    grid = tm.tile_grid(5, 5, tile_um=20.0)  # tile centres at 10, 30, 50, ... um
    assert grid[1, 1] and not grid[0, 0] and not grid[2, 2] and grid.sum() == 1
