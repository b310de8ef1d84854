"""Key-image thumbnails for the worklist: a windowed CT slice, a slide with its probability map.

Pure functions from arrays to PNG bytes (Pillow); no service, network or DB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Probability colour ramp (low -> high): blue, cyan, yellow, red. Reads on H&E pink and on grey.
_RAMP_AT = np.array([0.0, 0.35, 0.7, 1.0])
_RAMP_RGB = np.array([[40, 70, 200], [0, 190, 220], [250, 220, 30], [220, 20, 20]], dtype=np.float64)
OVERLAY_ALPHA = (0.25, 0.7)  # alpha at probability 0 and 1 inside tissue


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _fit(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Scale so the longer side is `size`, keeping the aspect ratio."""
    if size <= 0:
        raise ValueError(f"thumbnail size must be positive, not {size}")
    w, h = image.size
    scale = size / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def window_to_uint8(pixel_hu: np.ndarray, window: tuple[float, float] = (40, 80)) -> np.ndarray:
    """Map Hounsfield units through a (centre, width) window to 0..255."""
    centre, width = window
    if width <= 0:
        raise ValueError(f"window width must be positive, not {width}")
    low = centre - width / 2.0
    scaled = (np.asarray(pixel_hu, dtype=np.float64) - low) / width
    return (np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_ct_png(pixel_hu: np.ndarray, window: tuple[float, float] = (40, 80), size: int = 256) -> bytes:
    """A CT slice in HU, windowed (default brain 40/80), as a greyscale PNG of `size` px."""
    pixels = np.asarray(pixel_hu)
    if pixels.ndim != 2:
        raise ValueError(f"a CT slice must be 2-D, got shape {pixels.shape}")
    image = Image.fromarray(window_to_uint8(pixels, window), mode="L")
    return _png(_fit(image, size, Image.Resampling.LANCZOS))


def probability_rgba(heatmap: np.ndarray) -> np.ndarray:
    """Colour a probability map (0..1) as RGBA; NaN or negative (outside tissue) is transparent."""
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D, got shape {values.shape}")
    tissue = np.isfinite(values) & (values >= 0)
    p = np.clip(np.where(tissue, values, 0.0), 0.0, 1.0)
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    for channel in range(3):
        rgba[..., channel] = np.interp(p, _RAMP_AT, _RAMP_RGB[:, channel]).round().astype(np.uint8)
    alpha = OVERLAY_ALPHA[0] + (OVERLAY_ALPHA[1] - OVERLAY_ALPHA[0]) * p
    rgba[..., 3] = np.where(tissue, alpha * 255.0 + 0.5, 0).astype(np.uint8)
    return rgba


def render_heatmap_png(thumbnail_rgb: np.ndarray, heatmap: np.ndarray, size: int = 512) -> bytes:
    """A slide thumbnail with the tile probability map laid over it, as an RGBA PNG of `size` px.

    `heatmap` is at tile-grid resolution (rows x cols), probabilities 0..1, NaN or negative for
    tiles outside tissue; it is stretched over the thumbnail with nearest-neighbour so each
    tile stays a visible square, and is fully transparent outside tissue.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be H x W x 3, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    base = _fit(Image.fromarray(rgb[..., :3], mode="RGB"), size, Image.Resampling.LANCZOS).convert("RGBA")
    overlay = Image.fromarray(probability_rgba(heatmap), mode="RGBA").resize(base.size,
                                                                             Image.Resampling.NEAREST)
    return _png(Image.alpha_composite(base, overlay))
