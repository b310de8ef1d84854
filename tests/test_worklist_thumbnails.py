"""Key-image thumbnails: a windowed CT slice and a slide with its probability overlay."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.thumbnails import probability_rgba, render_ct_png, render_heatmap_png, window_to_uint8


def test_brain_window_maps_hu_to_grey():
    grey = window_to_uint8(np.array([-1000.0, 0.0, 40.0, 80.0, 3000.0]), (40, 80))
    assert grey.tolist() == [0, 0, 128, 255, 255]


def test_ct_png_is_greyscale_and_keeps_aspect():
    png = render_ct_png(np.zeros((512, 256)), size=256)
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L" and image.size == (128, 256)


def test_ct_png_refuses_a_volume():
    with pytest.raises(ValueError, match="2-D"):
        render_ct_png(np.zeros((3, 8, 8)))


def test_heatmap_is_transparent_outside_tissue():
    rgba = probability_rgba(np.array([[np.nan, -1.0], [0.0, 1.0]]))
    assert rgba[0, 0, 3] == 0 and rgba[0, 1, 3] == 0
    assert rgba[1, 1, 3] > rgba[1, 0, 3] > 0
    assert rgba[1, 1, 0] > rgba[1, 1, 2]  # high probability is red


def test_heatmap_png_overlays_the_thumbnail():
    thumb = np.full((200, 400, 3), 240, np.uint8)
    heat = np.full((4, 8), np.nan)
    heat[1:3, 2:6] = 0.9
    image = Image.open(io.BytesIO(render_heatmap_png(thumb, heat, size=512))).convert("RGBA")
    assert image.size == (512, 256)
    pixels = np.asarray(image)
    assert tuple(pixels[5, 5, :3]) == (240, 240, 240)  # outside tissue: the slide as it is
    r, g, b = pixels[128, 256, :3]
    assert r > 200 and b < 150  # inside: the red end of the ramp
