"""Read DICOM whole-slide images (VL Whole Slide Microscopy) one frame at a time.

A slide is the set of instances of one series: one per pyramid level (ImageType VOLUME) plus
optional LABEL / OVERVIEW images. For each level we read the header only (never the pixel
data), the geometry (total pixel matrix, tile size, pixel spacing, TILED_FULL or TILED_SPARSE
positions) and a frame table (file offset and length of each frame) from the Extended Offset
Table, the Basic Offset Table, or by walking the item headers when the BOT is empty.
A frame is decoded on demand: JPEG baseline with Pillow, JPEG 2000 with imagecodecs.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from pipelines.findings import NotAnalysable

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
NATIVE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
SUPPORTED_SYNTAXES = (JPEG_BASELINE, *JPEG2000_SYNTAXES, *NATIVE_SYNTAXES)
FILL = 255  # value for pixels no frame covers (TILED_SPARSE gaps, edges)
_ITEM, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


@dataclass(frozen=True)
class Level:
    """One pyramid level: geometry plus where each frame lies in the file."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    cols: int  # TotalPixelMatrixColumns
    rows: int  # TotalPixelMatrixRows
    tile_cols: int  # Columns of one frame
    tile_rows: int
    spacing_um: float  # column spacing (um/px); rows are checked to match
    tiling: str  # TILED_FULL or TILED_SPARSE
    frame_offsets: np.ndarray = field(repr=False)  # int64 absolute file offsets of frame data
    frame_lengths: np.ndarray = field(repr=False)  # int64 byte lengths
    tile_index: dict[tuple[int, int], int] = field(repr=False, default_factory=dict)  # sparse only

    @property
    def grid(self) -> tuple[int, int]:
        """(tile rows, tile columns) of the frame grid."""
        return -(-self.rows // self.tile_rows), -(-self.cols // self.tile_cols)

    @property
    def n_frames(self) -> int:
        return len(self.frame_offsets)

    def frame_at(self, ty: int, tx: int) -> int | None:
        """0-based frame index of tile (row ty, column tx), or None where a sparse slide has none."""
        if self.tiling == "TILED_SPARSE":
            return self.tile_index.get((ty, tx))
        nty, ntx = self.grid
        if not (0 <= ty < nty and 0 <= tx < ntx):
            return None
        return ty * ntx + tx


@dataclass(frozen=True)
class Slide:
    levels: tuple[Level, ...]  # finest first
    associated: dict[str, Path]  # LABEL / OVERVIEW / THUMBNAIL paths
    study_instance_uid: str
    series_instance_uid: str

    def nearest_level(self, spacing_um: float) -> Level:
        """The level whose spacing is nearest the target (in log scale); ties go to the finer."""
        return min(self.levels, key=lambda lv: (abs(np.log(lv.spacing_um / spacing_um)), lv.spacing_um))

    @property
    def thumbnail_level(self) -> Level:
        return self.levels[-1]


def _first(ds: pydicom.Dataset, *keywords: str) -> pydicom.Dataset | None:
    node = ds
    for kw in keywords:
        seq = node.get(kw)
        if not seq:
            return None
        node = seq[0]
    return node


def _spacing_um(ds: pydicom.Dataset, where: str) -> float:
    pm = _first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
    if pm is None or "PixelSpacing" not in pm:
        pfg = ds.get("PerFrameFunctionalGroupsSequence")
        pm = _first(pfg[0], "PixelMeasuresSequence") if pfg else None
    if pm is None or "PixelSpacing" not in pm or not pm.PixelSpacing:
        raise NotAnalysable(f"slide {where} has no pixel spacing (PixelMeasuresSequence.PixelSpacing); "
                            "the scanner must export it for tiles to be read at the model's scale")
    row_mm, col_mm = (float(v) for v in pm.PixelSpacing)
    if row_mm <= 0 or col_mm <= 0:
        raise NotAnalysable(f"slide {where} has a non-positive pixel spacing {list(pm.PixelSpacing)}")
    return col_mm * 1000.0


def _read_items(fp, start: int) -> tuple[bytes, list[tuple[int, int]]]:
    """Walk the encapsulated items from `start` (just after the pixel data element header).

    Returns the BOT bytes and (absolute offset, length) of every fragment; reads only headers.
    """
    fp.seek(start)
    tag = struct.unpack("<HHI", fp.read(8))
    if (tag[0], tag[1]) != _ITEM:
        raise NotAnalysable(f"{fp.name}: encapsulated pixel data does not start with an item")
    bot = fp.read(tag[2])
    frags: list[tuple[int, int]] = []
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        g, e, length = struct.unpack("<HHI", head)
        if (g, e) == _SEQ_END:
            break
        if (g, e) != _ITEM:
            raise NotAnalysable(f"{fp.name}: unexpected tag ({g:04X},{e:04X}) among pixel data items")
        frags.append((fp.tell(), length))
        fp.seek(length, 1)
    return bot, frags


def _frame_table(path: Path, ds: pydicom.Dataset, data_start: int,
                 n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of each frame's bytes. One fragment per frame is the common case."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in NATIVE_SYNTAXES:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * (int(ds.BitsAllocated) // 8)
        with open(path, "rb") as fp:
            fp.seek(data_start)
            head = fp.read(12)
        value_at = data_start + (12 if head[4:6] in (b"OB", b"OW") else 8)
        offsets = value_at + size * np.arange(n_frames, dtype=np.int64)
        return offsets, np.full(n_frames, size, np.int64)
    with open(path, "rb") as fp:
        fp.seek(data_start)
        head = fp.read(12)
        items_at = data_start + 12
        if "ExtendedOffsetTable" in ds and ds.ExtendedOffsetTable:
            # first item after the (empty) BOT; EOT offsets count from there
            fp.seek(items_at)
            _, _, bot_len = struct.unpack("<HHI", fp.read(8))
            first = items_at + 8 + bot_len
            offs = np.frombuffer(ds.ExtendedOffsetTable, "<u8").astype(np.int64)
            lens = np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8").astype(np.int64)
            return first + offs + 8, lens
        bot, frags = _read_items(fp, items_at)
    if head[:4] != b"\xe0\x7f\x10\x00":
        raise NotAnalysable(f"{path}: pixel data element not found where the header ends")
    if len(frags) == n_frames:
        return (np.array([o for o, _ in frags], np.int64), np.array([n for _, n in frags], np.int64))
    raise NotAnalysable(f"{path}: {len(frags)} fragments for {n_frames} frames; frames split over "
                        "several fragments are not supported")


def _pixel_data_start(path: Path) -> tuple[pydicom.Dataset, int]:
    """The header (without pixel data) and the file offset of the Pixel Data element."""
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        pos = fp.tell()
        fp.seek(pos)
        if fp.read(4) == b"\xe0\x7f\x10\x00":
            return ds, pos
    raise NotAnalysable(f"{path}: no pixel data after the header")


def read_level(path: str | Path) -> tuple[Level | None, pydicom.Dataset]:
    """Read one instance's header and frame table; None for LABEL / OVERVIEW / THUMBNAIL images."""
    path = Path(path)
    ds, start = _pixel_data_start(path)
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        raise NotAnalysable(f"{path}: SOP class {ds.get('SOPClassUID')} is not VL Whole Slide Microscopy")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if len(image_type) > 2 and image_type[2] in ("LABEL", "OVERVIEW", "THUMBNAIL"):
        return None, ds
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in SUPPORTED_SYNTAXES:
        name = pydicom.uid.UID(ts).name
        raise NotAnalysable(f"slide {ds.SeriesInstanceUID}: transfer syntax {name} ({ts}) is not supported; "
                            "send JPEG baseline, JPEG 2000 or uncompressed tiles")
    if int(ds.get("SamplesPerPixel", 3)) != 3:
        raise NotAnalysable(f"slide {ds.SeriesInstanceUID}: {ds.SamplesPerPixel} samples per pixel; "
                            "the model needs RGB (brightfield) images")
    spacing = _spacing_um(ds, str(ds.SeriesInstanceUID))
    n_frames = int(ds.get("NumberOfFrames", 1))
    tiling = str(ds.get("DimensionOrganizationType", "TILED_SPARSE")).upper()
    tile_rows, tile_cols = int(ds.Rows), int(ds.Columns)
    cols = int(ds.get("TotalPixelMatrixColumns", tile_cols))
    rows = int(ds.get("TotalPixelMatrixRows", tile_rows))
    index: dict[tuple[int, int], int] = {}
    if tiling != "TILED_FULL":
        tiling = "TILED_SPARSE"
        for i, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
            pos = _first(item, "PlanePositionSlideSequence")
            if pos is None:
                raise NotAnalysable(f"{path}: frame {i + 1} has no PlanePositionSlideSequence")
            r, c = int(pos.RowPositionInTotalImagePixelMatrix), int(pos.ColumnPositionInTotalImagePixelMatrix)
            if (r - 1) % tile_rows or (c - 1) % tile_cols:
                raise NotAnalysable(f"{path}: frame {i + 1} at ({r}, {c}) is not on the tile grid")
            index[((r - 1) // tile_rows, (c - 1) // tile_cols)] = i
    offsets, lengths = _frame_table(path, ds, start, n_frames)
    level = Level(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), ts, cols, rows, tile_cols, tile_rows,
                  spacing, tiling, offsets, lengths, index)
    return level, ds


def open_slide(paths: Sequence[str | Path]) -> Slide:
    """Group a slide's instances into levels (finest first) and associated images."""
    levels: list[Level] = []
    associated: dict[str, Path] = {}
    study = series = ""
    for p in paths:
        level, ds = read_level(p)
        study, series = str(ds.get("StudyInstanceUID", study)), str(ds.get("SeriesInstanceUID", series))
        if level is None:
            associated[str(ds.ImageType[2]).upper()] = Path(p)
        else:
            levels.append(level)
    if not levels:
        only = sorted(associated) or "nothing"
        raise NotAnalysable(f"slide {series or '?'} has no pyramid level (only {only})")
    levels.sort(key=lambda lv: lv.spacing_um)
    return Slide(tuple(levels), associated, study, series)


def header(path: str | Path) -> pydicom.Dataset:
    """A slide instance's header without pixel data (for references in SR and SEG)."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def decode_frame(level: Level, index: int, fp=None) -> np.ndarray:
    """Decode frame `index` (0-based) of a level into an RGB uint8 array (tile_rows, tile_cols, 3)."""
    own = fp is None
    if own:
        fp = open(level.path, "rb")  # noqa: SIM115 - closed below
    try:
        fp.seek(int(level.frame_offsets[index]))
        data = fp.read(int(level.frame_lengths[index]))
    finally:
        if own:
            fp.close()
    return decode_bytes(level.transfer_syntax, data, level.tile_rows, level.tile_cols)


def decode_bytes(ts: str, data: bytes, rows: int, cols: int) -> np.ndarray:
    if ts == JPEG_BASELINE:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    elif ts in JPEG2000_SYNTAXES:
        import imagecodecs

        arr = imagecodecs.jpeg2k_decode(data)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        arr = arr.astype(np.uint8, copy=False)
    elif ts in NATIVE_SYNTAXES:
        arr = np.frombuffer(data, np.uint8).reshape(rows, cols, 3)
    else:
        raise NotAnalysable(f"transfer syntax {ts} is not supported")
    if arr.shape[:2] != (rows, cols):
        raise NotAnalysable(f"a frame decoded to {arr.shape[:2]}, the header says {(rows, cols)}")
    return arr


def read_region(level: Level, x: int, y: int, width: int, height: int, fp=None) -> np.ndarray:
    """RGB pixels of the level's total pixel matrix in [y, y+height) x [x, x+width); FILL outside."""
    out = np.full((height, width, 3), FILL, np.uint8)
    tr, tc = level.tile_rows, level.tile_cols
    own = fp is None
    if own:
        fp = open(level.path, "rb")  # noqa: SIM115 - closed below
    try:
        for ty in range(max(y, 0) // tr, min(y + height, level.rows - 1) // tr + 1):
            for tx in range(max(x, 0) // tc, min(x + width, level.cols - 1) // tc + 1):
                idx = level.frame_at(ty, tx)
                if idx is None:
                    continue
                tile = decode_frame(level, idx, fp)
                y0, x0 = ty * tr, tx * tc
                sy0, sx0 = max(y, y0), max(x, x0)
                sy1 = min(y + height, y0 + tr, level.rows)
                sx1 = min(x + width, x0 + tc, level.cols)
                if sy1 > sy0 and sx1 > sx0:
                    out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    finally:
        if own:
            fp.close()
    return out


def read_level_image(level: Level) -> np.ndarray:
    """The whole level as one RGB array; only for small levels (thumbnails)."""
    if level.cols * level.rows > 64e6:
        raise ValueError(f"level {level.sop_instance_uid} is {level.cols}x{level.rows}: too large to read")
    return read_region(level, 0, 0, level.cols, level.rows)


def read_thumbnail_rgb(paths: Sequence[str | Path], max_px: int = 2048) -> np.ndarray:
    """The smallest pyramid level as RGB, average-pooled to at most `max_px` (for previews)."""
    level = open_slide(paths).thumbnail_level
    rgb = read_level_image(level)
    factor = int(np.ceil(max(rgb.shape[:2]) / max_px))
    if factor > 1:
        h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
        blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
        rgb = blocks.mean(axis=(1, 3)).astype(np.uint8)
    return rgb
