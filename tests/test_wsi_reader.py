"""Reading slides frame by frame: TILED_FULL, TILED_SPARSE, JPEG 2000, missing offset tables."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from phantoms.wsi_slide import write_wsi_slide
from pipelines.findings import NotAnalysable
from pipelines.wsi_analysis import choose_level
from pipelines.wsi_slide import decode_frame, open_slide, read_region

W, H, SEED = 4096, 3072, 21


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    variants = {
        "full": {},
        "sparse": {"tiling": "sparse"},
        "j2k": {"codec": "jpeg2000"},
        "no_bot": {"offset_table": "none"},
        "eot": {"offset_table": "extended"},
    }
    return {name: write_wsi_slide(root / name, W, H, 0.3, SEED, label=name == "full", **kw)
            for name, kw in variants.items()}


def _level1(paths):
    return open_slide(paths).levels[1]


def test_tiled_full_frames_match_pydicom(slides):
    level = _level1(slides["full"])
    assert level.tiling == "TILED_FULL" and level.grid == (6, 8)
    ds = pydicom.dcmread(level.path)
    for i in (0, 13, level.n_frames - 1):
        assert np.array_equal(decode_frame(level, i), ds.pixel_array[i])


def test_tiled_sparse_uses_per_frame_positions(slides):
    full, sparse = _level1(slides["full"]), _level1(slides["sparse"])
    assert sparse.tiling == "TILED_SPARSE"
    assert sparse.frame_at(0, 1) != full.frame_at(0, 1)  # frames are stored column by column
    a = read_region(full, 100, 200, 900, 700)
    b = read_region(sparse, 100, 200, 900, 700)
    assert np.array_equal(a, b)


def test_jpeg2000_frames_decode_close_to_jpeg(slides):
    level = _level1(slides["j2k"])
    assert level.transfer_syntax == "1.2.840.10008.1.2.4.91"
    a = read_region(_level1(slides["full"]), 0, 0, level.cols, level.rows).astype(int)
    b = read_region(level, 0, 0, level.cols, level.rows).astype(int)
    assert np.abs(a - b).mean() < 6


@pytest.mark.parametrize("variant", ["no_bot", "eot"])
def test_frames_found_without_a_basic_offset_table(slides, variant):
    ref, other = _level1(slides["full"]), _level1(slides[variant])
    # absolute offsets move with the header and BOT sizes; relative positions must agree
    assert np.array_equal(ref.frame_offsets - ref.frame_offsets[0],
                          other.frame_offsets - other.frame_offsets[0])
    assert np.array_equal(ref.frame_lengths, other.frame_lengths)
    assert np.array_equal(decode_frame(ref, 20), decode_frame(other, 20))


def test_levels_and_associated_images_are_grouped(slides):
    slide = open_slide(slides["full"])
    assert [lv.spacing_um for lv in slide.levels] == [0.25, 0.5]
    assert set(slide.associated) == {"LABEL"}
    assert choose_level(slide, 0.5).spacing_um == 0.5
    assert choose_level(slide, 0.25).spacing_um == 0.25
    assert choose_level(slide, 2.0).spacing_um == 0.5  # coarsest level not coarser than the model
    with pytest.raises(NotAnalysable, match="um/px"):
        choose_level(slide, 0.1)


def test_missing_pixel_spacing_is_not_analysable(slides, tmp_path):
    ds = pydicom.dcmread(slides["full"][1])
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(NotAnalysable, match="no pixel spacing"):
        open_slide([tmp_path / "x.dcm"])


def test_unsupported_transfer_syntax_is_not_analysable(slides, tmp_path):
    ds = pydicom.dcmread(slides["full"][1])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(NotAnalysable, match="not supported"):
        open_slide([tmp_path / "x.dcm"])


# --- JPEG colour: the stream's markers against PhotometricInterpretation ------------------------


def _patch() -> np.ndarray:
    """64 x 64 px of H&E-like colours (pink to purple), smooth enough for JPEG to keep them."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    rgb = np.stack([230 - 110 * yy, 150 - 80 * xx, 200 - 40 * yy * xx], axis=-1)
    return rgb.round().astype(np.uint8)


def _segments(data: bytes):
    """(marker, body) of each segment before the scan, then (0xDA, the rest after the marker)."""
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            yield marker, data[i + 2:]
            return
        yield marker, data[i + 4:i + 2 + length]
        i += 2 + length


def _silent(data: bytes) -> bytes:
    """The same stream without JFIF / Adobe markers and with component IDs 1, 2, 3: a stream
    that does not say how it is coded (as some converters write it)."""
    out = bytearray(data[:2])
    for marker, body in _segments(data):
        body = bytearray(body)
        if marker in (0xE0, 0xEE):
            continue
        if marker == 0xC0:
            for k in range(body[5]):
                body[6 + 3 * k] = k + 1
        if marker == 0xDA:
            length = int.from_bytes(body[:2], "big")
            for k in range(body[2]):
                body[3 + 2 * k] = k + 1
            out += b"\xff\xda" + bytes(body[:length]) + bytes(body[length:])
            break
        out += bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + bytes(body)
    return bytes(out)


def _frames_built_both_ways(rgb: np.ndarray) -> dict[str, tuple[bytes, str, str | None]]:
    """name -> (JPEG bytes, PhotometricInterpretation declared, colour space the stream states)."""
    import io

    import imagecodecs
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=0)
    ycbcr = buf.getvalue()  # YCbCr-coded with a JFIF marker
    plain = bytes(imagecodecs.jpeg8_encode(rgb, 95, colorspace="RGB", outcolorspace="RGB"))  # Adobe, RGB
    return {
        "YCbCr coded, JFIF, declared RGB (the wsi2dcm quirk)": (ycbcr, "RGB", "YCbCr"),
        "RGB coded, Adobe, declared RGB": (plain, "RGB", "RGB"),
        "RGB coded, Adobe, declared YBR_FULL_422": (plain, "YBR_FULL_422", "RGB"),
        "RGB coded, no markers, declared RGB": (_silent(plain), "RGB", None),
        "YCbCr coded, no markers, declared YBR_FULL_422": (_silent(ycbcr), "YBR_FULL_422", None),
    }


def test_jpeg_frames_decode_to_the_right_colours_whichever_way_they_were_built():
    from pipelines.wsi_slide import JPEG_BASELINE, decode_bytes, jpeg_colour_space

    rgb = _patch()
    for name, (data, photometric, stated) in _frames_built_both_ways(rgb).items():
        assert jpeg_colour_space(data) == stated, name
        decoded = decode_bytes(JPEG_BASELINE, data, 64, 64, photometric)
        error = np.abs(decoded.astype(int) - rgb.astype(int)).mean(axis=(0, 1))
        assert error.max() < 4, f"{name}: mean error per channel {error}"


def test_a_slide_level_passes_its_photometric_interpretation_to_the_decoder(slides):
    level = _level1(slides["full"])
    assert level.photometric == "YBR_FULL_422"
