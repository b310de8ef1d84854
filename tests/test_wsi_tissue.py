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


def test_tissue_is_found_on_a_pyramid_that_goes_down_to_one_pixel(tmp_path):
    """A converter's pyramid down to 1 x 1 px once gave "no tissue found (0.00 % of 1 tiles)"."""
    from pathlib import Path

    from pipelines.model_card import load_card
    from pipelines.wsi_analysis import analyse_wsi_slide

    paths = write_wsi_slide(tmp_path, W, H, 0.3, 31, smallest_px=1)
    slide = open_slide(paths)
    assert min(slide.levels[-1].rows, slide.levels[-1].cols) == 1
    card = load_card(Path(__file__).resolve().parents[1] / "models" / "tumor_wsi", verify=False)
    result = analyse_wsi_slide(card, paths, lambda x: np.zeros((len(x), 2), np.float32))
    assert result.analysed, result.reason
    hm = result.heatmap
    kept = np.array(hm["values"]).reshape(hm["rows"], hm["cols"]) >= 0
    cell = hm["tile_size_px"] * hm["spacing_um"] / 0.25  # one tile in base pixels
    truth = tissue_mask(W, H, 31, kept.shape, cell_size=cell)
    assert 0.1 < kept.mean() < 0.9  # tissue, not "nothing" and not "everything"
    assert _dice(kept, truth) >= 0.8


def test_overview_level_is_near_8_to_16_um_and_never_under_256_px(tmp_path):
    from pipelines.wsi_slide import read_overview

    slide = open_slide(write_wsi_slide(tmp_path, 8192, 6144, 0.0, 32, tissue=False, smallest_px=1))
    # levels 0.25 um * 2^k: 8 um (k=5) would be 256 x 192 px, under 256 on its short side, so
    # the nearest one that is large enough is 4 um (512 x 384), not the 1 x 1 px at the bottom
    level = slide.overview_level()
    assert level.spacing_um == 4.0 and (level.cols, level.rows) == (512, 384)
    rgb, spacing = read_overview(slide)
    assert rgb.shape == (384, 512, 3) and spacing == 4.0


def test_a_single_level_slide_is_read_for_tissue_frame_by_frame_and_pooled(tmp_path):
    """No pyramid at all (some exports): the base level is pooled tile by tile to <= 2048 px."""
    from pipelines.wsi_slide import read_level_pooled, read_overview

    paths = write_wsi_slide(tmp_path, W, H, 0.3, 31)
    slide = open_slide(paths[:1])
    assert len(slide.levels) == 1
    rgb, spacing = read_overview(slide)
    assert rgb.shape == (1536, 2048, 3) and spacing == 0.5
    base = open_slide(paths).levels[1]  # the phantom's own 2x level, made from the same fields
    assert np.abs(rgb.astype(int) - read_level_image(base).astype(int)).mean() < 8
    assert read_level_pooled(slide.levels[0], 3).shape == (1024, 1366, 3)
    found = detect_tissue(rgb, spacing)
    truth = tissue_mask(W, H, 31, found.mask.shape, cell_size=found.spacing_um / 0.25)
    assert _dice(found.mask, truth) >= 0.9
