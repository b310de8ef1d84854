"""Read DICOM whole-slide images (VL Whole Slide Microscopy) one frame at a time.

A slide is the set of instances of one series: one per pyramid level (ImageType VOLUME) plus
optional LABEL / OVERVIEW images. For each level we read the header only (never the pixel
data), the geometry (total pixel matrix, tile size, pixel spacing, TILED_FULL or TILED_SPARSE
positions) and a frame table (file offset and length of each frame) from the Extended Offset
Table, the Basic Offset Table, or by walking the item headers when the BOT is empty.
A frame is decoded on demand: JPEG baseline with Pillow, JPEG 2000 with imagecodecs.

JPEG colour: a JPEG stream says itself how its three components are coded (an Adobe APP14
marker's transform flag, a JFIF APP0 marker, or component IDs 'R', 'G', 'B'), and that wins
over PhotometricInterpretation: converters write RGB with YCbCr-coded JFIF frames (wsi2dcm,
wsidicomizer's re-encoded levels) and YBR_FULL_422 with RGB-coded Adobe frames. Only a
stream that says nothing is read the way PhotometricInterpretation declares it (libjpeg
alone would assume YCbCr and turn a plain RGB frame into false colours).

Converters also omit attributes a slide "should" have; `SLIDE_DEFAULTS` lists the values used
instead (documented, logged by name) so that reading and the result objects never fail on them.
"""

from __future__ import annotations

import copy
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
# Tissue detection and previews read the level nearest this band of spacings (a 2 cm specimen is
# 1250-2500 px there), never one smaller than OVERVIEW_MIN_SIDE_PX on its short side: pyramids
# that go down to 1 x 1 px left "no tissue found (0.00 % of 1 tiles)" when the smallest was read.
OVERVIEW_SPACING_UM = (8.0, 16.0)
OVERVIEW_MIN_SIDE_PX = 256
OVERVIEW_MAX_PX = 2048  # a larger level is decoded frame by frame and average-pooled to this
USING_SUBSTANCE = "424361007"  # SCT "Using substance" (TID 8004 staining step)
ASSUMED_STAINS = ("hematoxylin stain", "water soluble eosin stain")  # SLIDE_DEFAULTS["stain"]
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
    photometric: str = ""  # PhotometricInterpretation, for JPEG streams that do not say

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
    stains: tuple[str, ...] = ASSUMED_STAINS  # staining substances (lower case), see slide_stains
    stains_stated: bool = False  # False: the slide names none and H&E is assumed

    def nearest_level(self, spacing_um: float) -> Level:
        """The level whose spacing is nearest the target (in log scale); ties go to the finer."""
        return min(self.levels, key=lambda lv: (abs(np.log(lv.spacing_um / spacing_um)), lv.spacing_um))

    @property
    def thumbnail_level(self) -> Level:
        return self.levels[-1]

    def overview_level(self) -> Level:
        """The level to look at the whole slide: nearest OVERVIEW_SPACING_UM (inside the band, the
        finer), among those at least OVERVIEW_MIN_SIDE_PX on the short side (else the largest)."""
        big = [lv for lv in self.levels if min(lv.rows, lv.cols) >= OVERVIEW_MIN_SIDE_PX]
        if not big:
            big = [max(self.levels, key=lambda lv: min(lv.rows, lv.cols))]
        lo, hi = OVERVIEW_SPACING_UM

        def off_band(lv: Level) -> float:
            s = lv.spacing_um
            return float(np.log(lo / s)) if s < lo else float(np.log(s / hi)) if s > hi else 0.0

        return min(big, key=lambda lv: (off_band(lv), lv.spacing_um))


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
                  spacing, tiling, offsets, lengths, index,
                  str(ds.get("PhotometricInterpretation", "")).upper())
    return level, ds


def open_slide(paths: Sequence[str | Path]) -> Slide:
    """Group a slide's instances into levels (finest first) and associated images."""
    levels: list[Level] = []
    associated: dict[str, Path] = {}
    study = series = ""
    stains, stated = ASSUMED_STAINS, False
    for p in paths:
        level, ds = read_level(p)
        study, series = str(ds.get("StudyInstanceUID", study)), str(ds.get("SeriesInstanceUID", series))
        if level is None:
            associated[str(ds.ImageType[2]).upper()] = Path(p)
        else:
            levels.append(level)
            if not stated:
                stains, stated = slide_stains(ds)
    if not levels:
        only = sorted(associated) or "nothing"
        raise NotAnalysable(f"slide {series or '?'} has no pyramid level (only {only})")
    # finest first; where two instances hold the same level (a TILED_SPARSE copy sent with the
    # TILED_FULL one), the full one with the most frames comes first and is the one read
    levels.sort(key=lambda lv: (lv.spacing_um, lv.tiling != "TILED_FULL", -lv.n_frames))
    return Slide(tuple(levels), associated, study, series, stains, stated)


# What a slide instance gets where the converter left an attribute out (DICOM PS3.3 C.8.12.4
# calls most of them type 1; wsidicomizer, EZ-WSI and others omit them). Values are the
# standard's own defaults where it has one, else what says "not known" in the attribute's VR.
SLIDE_DEFAULTS: dict[str, str] = {
    "TotalPixelMatrixOriginSequence": "X 0 mm, Y 0 mm: the pixel matrix starts at the slide origin",
    "ImageOrientationSlide": "0\\-1\\0\\-1\\0\\0: along a row -Y, down a column -X (the usual "
                             "scanner orientation, label on the left)",
    "OpticalPathSequence": "one brightfield, full-spectrum optical path '1'",
    "ContainerIdentifier": "UNKNOWN",
    "SpecimenDescriptionSequence": "one specimen: identifier = the container identifier, a UID "
                                   "derived from the series UID, no preparation steps",
    "stain": "H&E, assumed when SpecimenPreparationSequence states no staining substance",
}


def _item(**values: object) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for kw, value in values.items():
        setattr(item, kw, value)
    return item


def with_slide_defaults(ds: pydicom.Dataset) -> tuple[pydicom.Dataset, list[str]]:
    """A copy of a slide header with `SLIDE_DEFAULTS` filled in, and the names of those filled."""
    out = copy.deepcopy(ds)
    filled: list[str] = []
    if not out.get("TotalPixelMatrixOriginSequence"):
        out.TotalPixelMatrixOriginSequence = [_item(XOffsetInSlideCoordinateSystem=0.0,
                                                    YOffsetInSlideCoordinateSystem=0.0)]
        filled.append("TotalPixelMatrixOriginSequence")
    if len(out.get("ImageOrientationSlide") or ()) != 6:
        out.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        filled.append("ImageOrientationSlide")
    if not out.get("OpticalPathSequence"):
        code = _item(CodeValue="111744", CodingSchemeDesignator="DCM", CodeMeaning="Brightfield illumination")
        colour = _item(CodeValue="414298005", CodingSchemeDesignator="SCT", CodeMeaning="Full Spectrum")
        out.OpticalPathSequence = [_item(OpticalPathIdentifier="1", IlluminationTypeCodeSequence=[code],
                                         IlluminationColorCodeSequence=[colour])]
        out.NumberOfOpticalPaths = 1
        filled.append("OpticalPathSequence")
    if not str(out.get("ContainerIdentifier", "") or "").strip():
        out.ContainerIdentifier = "UNKNOWN"
        filled.append("ContainerIdentifier")
    if not out.get("SpecimenDescriptionSequence"):
        series = str(out.get("SeriesInstanceUID", ""))
        uid = pydicom.uid.generate_uid(entropy_srcs=["befund-specimen", series])
        out.SpecimenDescriptionSequence = [_item(
            SpecimenIdentifier=out.ContainerIdentifier, SpecimenUID=uid,
            IssuerOfTheSpecimenIdentifierSequence=[], SpecimenPreparationSequence=[])]
        filled.append("SpecimenDescriptionSequence")
    return out, filled


def slide_stains(ds: pydicom.Dataset) -> tuple[tuple[str, ...], bool]:
    """The staining substances a slide states (code meanings, lower case) and whether they were
    stated at all; a slide that states none is taken as H&E (`SLIDE_DEFAULTS["stain"]`)."""
    found: list[str] = []
    for spec in ds.get("SpecimenDescriptionSequence") or ():
        for step in spec.get("SpecimenPreparationSequence") or ():
            for item in step.get("SpecimenPreparationStepContentItemSequence") or ():
                name = _first(item, "ConceptNameCodeSequence")
                value = _first(item, "ConceptCodeSequence")
                substance = name is not None and str(name.get("CodeValue", "")) == USING_SUBSTANCE
                if substance and value is not None:
                    found.append(str(value.get("CodeMeaning", value.get("CodeValue", ""))).strip().lower())
    if found:
        return tuple(dict.fromkeys(found)), True
    return ASSUMED_STAINS, False


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
    return decode_bytes(level.transfer_syntax, data, level.tile_rows, level.tile_cols, level.photometric)


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_colour_space(data: bytes) -> str | None:
    """How a JPEG stream says its three components are coded: "RGB", "YCbCr", or None (it does not).

    The order is libjpeg's: an Adobe APP14 marker's transform flag (0: RGB, else YCbCr), then a
    JFIF APP0 marker (YCbCr), then component IDs 'R', 'G', 'B' in the frame header (RGB).
    Reads only the marker segments before the scan, each bounded by the stream's length.
    """
    adobe: int | None = None
    jfif = False
    i = 2  # after SOI
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not a marker where one must be: let the decoder report it
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        body = data[i + 4:i + 2 + length]
        if marker == 0xE0 and body[:5] == b"JFIF\0":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        elif marker in _SOF_MARKERS:
            if adobe is not None:
                return "RGB" if adobe == 0 else "YCbCr"
            if jfif:
                return "YCbCr"
            ids = tuple(body[6 + 3 * k] for k in range(min(body[5] if len(body) > 5 else 0, 3)))
            return "RGB" if len(ids) == 3 and ids == (0x52, 0x47, 0x42) else None
        elif marker == 0xDA:  # start of scan without a frame header: malformed
            return None
        i += 2 + length
    return None


def _decode_jpeg(data: bytes, photometric: str) -> np.ndarray:
    """JPEG baseline -> RGB; the stream's own markers first, PhotometricInterpretation when silent."""
    if photometric == "RGB" and jpeg_colour_space(data) is None:
        import imagecodecs

        # libjpeg would take a silent stream for YCbCr; the header says RGB, so read it as coded
        return imagecodecs.jpeg8_decode(data, colorspace="RGB", outcolorspace="RGB")
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_bytes(ts: str, data: bytes, rows: int, cols: int, photometric: str = "") -> np.ndarray:
    """One frame's bytes -> RGB uint8 (rows, cols, 3); `photometric` is the instance's
    PhotometricInterpretation (JPEG colour is described in the module docstring)."""
    if ts == JPEG_BASELINE:
        arr = _decode_jpeg(data, photometric)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
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


def read_level_pooled(level: Level, factor: int) -> np.ndarray:
    """The level average-pooled by `factor` (output pixel i covers level pixels [i*f, (i+1)*f)),
    decoded one frame at a time: memory holds the output, never the level."""
    if factor < 1:
        raise ValueError(f"pooling factor must be at least 1, not {factor}")
    out_h, out_w = -(-level.rows // factor), -(-level.cols // factor)
    sums = np.zeros((out_h, out_w, 3), np.float32)
    counts = np.zeros((out_h, out_w, 1), np.float32)
    nty, ntx = level.grid
    tr, tc = level.tile_rows, level.tile_cols
    with open(level.path, "rb") as fp:
        for ty in range(nty):
            for tx in range(ntx):
                y0, x0 = ty * tr, tx * tc
                h, w = min(tr, level.rows - y0), min(tc, level.cols - x0)
                idx = level.frame_at(ty, tx)
                tile = (np.full((h, w, 3), FILL, np.float32) if idx is None
                        else decode_frame(level, idx, fp)[:h, :w].astype(np.float32))
                ri, ci = (y0 + np.arange(h)) // factor, (x0 + np.arange(w)) // factor
                rs = np.flatnonzero(np.r_[True, ri[1:] != ri[:-1]])
                cs = np.flatnonzero(np.r_[True, ci[1:] != ci[:-1]])
                block = np.add.reduceat(np.add.reduceat(tile, rs, axis=0), cs, axis=1)
                rows, cols = slice(ri[0], ri[-1] + 1), slice(ci[0], ci[-1] + 1)
                sums[rows, cols] += block
                counts[rows, cols, 0] += np.outer(np.diff(np.r_[rs, h]), np.diff(np.r_[cs, w]))
    return (sums / np.maximum(counts, 1.0) + 0.5).astype(np.uint8)


def read_overview(slide: Slide, max_px: int = OVERVIEW_MAX_PX) -> tuple[np.ndarray, float]:
    """The whole slide as RGB of at most `max_px` a side, and its pixel spacing in um."""
    level = slide.overview_level()
    factor = max(1, int(np.ceil(max(level.rows, level.cols) / max_px)))
    rgb = read_level_image(level) if factor == 1 else read_level_pooled(level, factor)
    return rgb, level.spacing_um * factor


def read_thumbnail_rgb(paths: Sequence[str | Path], max_px: int = 2048) -> np.ndarray:
    """The slide as RGB of at most `max_px` a side, from its overview level (for previews)."""
    return read_overview(open_slide(paths), max_px)[0]
