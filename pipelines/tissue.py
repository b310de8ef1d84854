"""Tissue detection on a low-resolution image of a slide, the way WSInfer does it.

Thumbnail of at most 2048 px, HSV saturation, median blur 7, threshold (card: 7/255), closing
6x6, then objects smaller than 200^2 um^2 and holes smaller than 190^2 um^2 are removed; a tile
is kept when its centre lies in tissue. Otsu on grey levels is the fallback when saturation
finds nothing. Blue and green pen ink (hue 90-250 degrees, strongly saturated) is excluded;
H&E stains sit at pink to purple hues (260-360 degrees).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

THUMBNAIL_MAX = 2048
MEDIAN_SIZE = 7
CLOSING_SIZE = 6
MIN_OBJECT_UM2 = 200.0**2
MIN_HOLE_UM2 = 190.0**2
INK_HUE_DEG = (90.0, 250.0)
INK_MIN_SATURATION = 0.25


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask whose pixels are `spacing_um` wide, anchored at the slide's origin."""

    mask: np.ndarray
    spacing_um: float
    method: str  # "saturation" or "otsu"
    ink_fraction: float = 0.0

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def keep(self, x_um: float, y_um: float) -> bool:
        """True when the point (slide coordinates in um from the top left corner) lies in tissue."""
        r, c = int(y_um / self.spacing_um), int(x_um / self.spacing_um)
        return 0 <= r < self.mask.shape[0] and 0 <= c < self.mask.shape[1] and bool(self.mask[r, c])

    def tile_grid(self, rows: int, cols: int, tile_um: float) -> np.ndarray:
        """Boolean (rows, cols) grid: a tile of side `tile_um` is kept when its centre lies in tissue."""
        ys = ((np.arange(rows) + 0.5) * tile_um / self.spacing_um).astype(int)
        xs = ((np.arange(cols) + 0.5) * tile_um / self.spacing_um).astype(int)
        inside_y, inside_x = ys < self.mask.shape[0], xs < self.mask.shape[1]
        grid = np.zeros((rows, cols), bool)
        sub = self.mask[np.ix_(ys[inside_y], xs[inside_x])]
        grid[np.ix_(inside_y, inside_x)] = sub
        return grid


def shrink_to_thumbnail(rgb: np.ndarray, spacing_um: float) -> tuple[np.ndarray, float]:
    """Average-pool by an integer factor until the longer side is at most THUMBNAIL_MAX px."""
    factor = int(np.ceil(max(rgb.shape[:2]) / THUMBNAIL_MAX))
    if factor <= 1:
        return rgb, spacing_um
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    pooled = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
    return pooled.astype(np.uint8), spacing_um * factor


def _majority(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary median filter: True where more than half of the size x size window is True."""
    return ndimage.uniform_filter(mask.astype(np.float32), size=size) > 0.5


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Strongly saturated blue or green pixels (pen ink); hue computed only where saturated."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    cand = (hi - lo) >= INK_MIN_SATURATION * np.maximum(hi, 1)
    out = np.zeros(rgb.shape[:2], bool)
    if not cand.any():
        return out
    px = rgb[cand].astype(np.float32) / 255.0
    hue = rgb2hsv(px[None])[0, :, 0] * 360.0
    out[cand] = (hue >= INK_HUE_DEG[0]) & (hue <= INK_HUE_DEG[1])
    return out


def detect_tissue(rgb: np.ndarray, spacing_um: float, saturation_threshold: float = 7.0,
                  exclude_ink: bool = True) -> TissueMask:
    """Tissue mask of an RGB thumbnail whose pixels are `spacing_um` wide."""
    rgb, spacing_um = shrink_to_thumbnail(rgb, spacing_um)
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    # HSV saturation on 0..255 is (max - min) * 255 / max; compare without dividing
    above = (hi - lo).astype(np.float32) * 255 > saturation_threshold * np.maximum(hi, 1)
    # a 7x7 median followed by a threshold equals a majority vote of the thresholded pixels
    mask = _majority(above, MEDIAN_SIZE)
    method = "saturation"
    if not mask.any() or mask.mean() > 0.95:
        grey = rgb.mean(axis=2)
        if np.ptp(grey) > 8:
            mask = grey < threshold_otsu(grey)
            method = "otsu"
        else:
            mask = np.zeros_like(mask)
    ink = np.zeros_like(mask)
    if exclude_ink:
        # a binary median is a majority vote
        ink = ndimage.maximum_filter(_majority(ink_mask(rgb), MEDIAN_SIZE), size=5)
        mask &= ~ink
    # closing with a 6x6 square (separable max then min filter)
    mask = ndimage.minimum_filter(ndimage.maximum_filter(mask, size=CLOSING_SIZE), size=CLOSING_SIZE)
    px_area = spacing_um**2
    mask = remove_small_objects(mask, max_size=max(int(MIN_OBJECT_UM2 / px_area), 1))
    mask = remove_small_holes(mask, max_size=max(int(MIN_HOLE_UM2 / px_area), 1))
    if exclude_ink:
        mask &= ~ink
    return TissueMask(mask, spacing_um, method, float(ink.mean()))
