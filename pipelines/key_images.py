"""Key images a radiologist can read: at least 512 px, the finding outlined, the window and
the slice position named, a colour legend for heatmaps. Pure functions from arrays to PNG.

- CT (`render_ct_key_image`): the slice in the model's window; the finding outlined in
  yellow: a segmentation mask's outline when the task gives one, else the largest region of
  blood density (50-90 HU) inside the head on that slice, which is where a bleed on a
  high-scoring slice lies; the legend says which of the two is drawn. The caption below the
  image names the window ("brain W80/L40"), the slice ("slice 12 of 24, z = 30.0 mm") and the
  slice's score.
- Slides (`render_slide_key_image`): the thumbnail with the tile probability map, the tiles
  at or above the model's threshold outlined, and a colour bar 0..1 with its name.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pipelines.thumbnails import _RAMP_AT, _RAMP_RGB, _fit, probability_rgba, window_to_uint8

MIN_SIZE = 512
NEAREST = Image.Resampling.NEAREST  # grids and masks keep their blocks
OUTLINE_RGB = (255, 221, 0)  # yellow: reads on grey CT and on H&E pink
CAPTION_BG = (16, 22, 34)
CAPTION_FG = (235, 240, 248)
BLOOD_HU = (50.0, 90.0)  # acute blood on non-contrast CT
WINDOW_NAMES = {(40.0, 80.0): "brain", (80.0, 200.0): "subdural", (600.0, 2800.0): "bone",
                (40.0, 400.0): "soft tissue", (-600.0, 1500.0): "lung"}


def window_label(window: tuple[float, float]) -> str:
    """"brain W80/L40" for a known preset (centre, width), else "W80/L40"."""
    centre, width = float(window[0]), float(window[1])
    name = WINDOW_NAMES.get((centre, width))
    text = f"W{width:g}/L{centre:g}"
    return f"{name} {text}" if name else text


def slice_label(index: int, count: int, z_mm: float | None) -> str:
    """"slice 12 of 24, z = 30.0 mm" (index counts from 1)."""
    where = f", z = {z_mm:.1f} mm" if z_mm is not None else ""
    return f"slice {index} of {count}{where}"


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask, two pixels thick."""
    inner = ndimage.binary_erosion(mask, iterations=2, border_value=0)
    return mask & ~inner


def blood_region(pixel_hu: np.ndarray) -> np.ndarray:
    """The largest connected region of blood density inside the head (bone and air excluded)."""
    hu = np.asarray(pixel_hu, dtype=np.float32)
    head = ndimage.binary_fill_holes(hu > -200)
    inside = ndimage.binary_erosion(head, iterations=6)  # off the scalp and the skull's edge
    blood = (hu >= BLOOD_HU[0]) & (hu <= BLOOD_HU[1]) & inside
    blood = ndimage.binary_opening(blood, iterations=1)
    labels, n = ndimage.label(blood)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = ndimage.sum(blood, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _caption(width: int, lines: list[str], legend: Image.Image | None = None) -> Image.Image:
    font = _font(max(14, width // 34))
    line_h = int(font.size * 1.35) if hasattr(font, "size") else 18
    legend_h = legend.height + 8 if legend is not None else 0
    strip = Image.new("RGB", (width, 10 + line_h * len(lines) + legend_h + 6), CAPTION_BG)
    draw = ImageDraw.Draw(strip)
    y = 8
    for line in lines:
        draw.text((10, y), line, fill=CAPTION_FG, font=font)
        y += line_h
    if legend is not None:
        strip.paste(legend, (10, y + 4))
    return strip


def _stack(image: Image.Image, caption: Image.Image) -> bytes:
    out = Image.new("RGB", (image.width, image.height + caption.height), CAPTION_BG)
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(caption, (0, image.height))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=3)  # 71 ms a key image here; optimize=True 126 ms
    return buffer.getvalue()


def _outline_swatch(text: str, size: int) -> Image.Image:
    """A legend entry: a yellow outlined square and what it marks."""
    font = _font(size)
    swatch = Image.new("RGB", (min(900, 40 + int(len(text) * size * 0.62)), size + 6), CAPTION_BG)
    draw = ImageDraw.Draw(swatch)
    draw.rectangle((1, 2, size + 1, size + 2), outline=OUTLINE_RGB, width=3)
    draw.text((size + 10, 1), text, fill=CAPTION_FG, font=font)
    return swatch


def render_ct_key_image(pixel_hu: np.ndarray, window: tuple[float, float], position: str,
                        score: float | None = None, mask: np.ndarray | None = None,
                        size: int = MIN_SIZE, notes: Sequence[str] = (),
                        outline_label: str | None = None) -> bytes:
    """A CT key image (PNG, `size` px wide, at least 512) with the finding outlined and its caption.

    `mask`: the segmentation of the finding on this slice, when the task gives one; without it
    the largest blood-density region is outlined (none is drawn when the slice has none).
    `notes`: further caption lines (a segmentation's area and volume); `outline_label`: the
    legend's words for the outline instead of the default."""
    hu = np.asarray(pixel_hu)
    if hu.ndim != 2:
        raise ValueError(f"a CT slice must be 2-D, got shape {hu.shape}")
    size = max(size, MIN_SIZE)
    region = np.asarray(mask, dtype=bool) if mask is not None else blood_region(hu)
    if region.shape != hu.shape:
        raise ValueError(f"mask shape {region.shape} is not the slice's {hu.shape}")
    grey = Image.fromarray(window_to_uint8(hu, window), mode="L").convert("RGB")
    image = _fit(grey, size, Image.Resampling.LANCZOS)
    if region.any():
        edge = Image.fromarray(region.astype(np.uint8) * 255, mode="L").resize(image.size, NEAREST)
        rgb = np.asarray(image).copy()
        rgb[_outline(np.asarray(edge) > 127)] = OUTLINE_RGB
        image = Image.fromarray(rgb, mode="RGB")
    scored = f", slice score {score:.2f}" if score is not None else ""
    marked = outline_label or ("outline: the finding's segmentation" if mask is not None
                               else "outline: blood-density region (50-90 HU) on this slice")
    caption = _caption(image.width, [f"{window_label(window)} \u00b7 {position}{scored}", *notes],
                       _outline_swatch(marked, max(13, image.width // 40)))
    return _stack(image, caption)


def colour_bar(width: int, height: int, title: str) -> Image.Image:
    """The heatmap's colour ramp from 0 to 1 with its ends and its name."""
    font = _font(max(12, height))
    bar_w = max(60, width - 20)
    ramp = np.linspace(0.0, 1.0, bar_w)
    rgb = np.stack([np.interp(ramp, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    bar = np.repeat(rgb[None, :, :], height, axis=0).round().astype(np.uint8)
    out = Image.new("RGB", (bar_w, height + int(font.size * 1.5) + 4), CAPTION_BG)
    out.paste(Image.fromarray(bar, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    y = height + 2
    draw.text((0, y), "0", fill=CAPTION_FG, font=font)
    draw.text((bar_w // 2 - int(len(title) * font.size * 0.3), y), title, fill=CAPTION_FG, font=font)
    draw.text((bar_w - int(font.size * 0.7), y), "1", fill=CAPTION_FG, font=font)
    return out


def render_slide_key_image(thumbnail_rgb: np.ndarray, heatmap: np.ndarray, threshold: float,
                           title: str = "tumor probability", size: int = MIN_SIZE) -> bytes:
    """A slide with its tile probability map, the tiles at or above `threshold` outlined, and a
    colour bar; PNG `size` px wide (at least 512)."""
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be H x W x 3, got shape {rgb.shape}")
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D, got shape {values.shape}")
    size = max(size, MIN_SIZE)
    base = _fit(Image.fromarray(np.clip(rgb[..., :3], 0, 255).astype(np.uint8), mode="RGB"), size,
                Image.Resampling.LANCZOS).convert("RGBA")
    overlay = Image.fromarray(probability_rgba(values), mode="RGBA").resize(base.size, NEAREST)
    image = Image.alpha_composite(base, overlay).convert("RGB")
    above = np.isfinite(values) & (values >= threshold)
    if above.any():
        grid = Image.fromarray(above.astype(np.uint8) * 255, mode="L").resize(image.size, NEAREST)
        pixels = np.asarray(image).copy()
        pixels[_outline(np.asarray(grid) > 127)] = OUTLINE_RGB
        image = Image.fromarray(pixels, mode="RGB")
    legend = colour_bar(image.width, max(12, image.width // 40), title)
    lines = [f"tiles at or above the model's threshold {threshold:.2f} outlined in yellow"]
    return _stack(image, _caption(image.width, lines, legend))
