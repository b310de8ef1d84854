"""Synthetic H&E whole-slide images as DICOM VL Whole Slide Microscopy Image instances.

A slide is a pyramid: one instance per 2x level, from the base (0.25 um/px) down to a thumbnail
of at most `THUMBNAIL_MAX` px, all with 256-px JPEG (or JPEG 2000) frames, plus optional LABEL
and OVERVIEW instances, in one series and frame of reference.

The content is a function of tile coordinates and a few low-resolution fields, so a slide of
100k x 80k px is written tile by tile and never held whole in memory:

- smooth fields on a ~256-cell grid give tissue (a few irregular blobs), tumor (a fraction of the
  tissue), pen marks (blue or green bands) and folds (darker bands inside tissue);
- per level, a small bank of textures rendered at that level's pixel spacing (pink stroma with
  purple nuclei; tumor: denser, larger, irregular, darker nuclei);
- per tile, a hash-seeded choice of textures (with a random flip/rotation), composed with the
  fields bilinearly upsampled to the tile. Background tiles reuse one encoded frame.

`tumor_mask` and `tissue_mask` give the known truth at any grid resolution.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import struct
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000, UID, JPEGBaseline8Bit
from scipy import ndimage

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
BASE_SPACING_UM = 0.25
TILE = 256
THUMBNAIL_MAX = 2048
FIELD_CELLS = 256  # cells along the slide's longer side for the low-resolution fields
UID_ROOT = "1.2.826.0.1.3680043.10.1338."  # befund phantom root (deterministic UIDs)

BACKGROUND = np.array([242, 240, 244], np.float32)
STROMA = np.array([236, 168, 196], np.float32)
TUMOR_STROMA = np.array([214, 150, 190], np.float32)
NUCLEUS = np.array([112, 62, 150], np.float32)
TUMOR_NUCLEUS = np.array([72, 34, 112], np.float32)
INKS = (np.array([36, 72, 172], np.float32), np.array([40, 136, 72], np.float32))


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return UID_ROOT + str(int(digest[:30], 16))[:34]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-9)


@dataclass(frozen=True)
class SlideFields:
    """Low-resolution fields; a cell is `cell` base pixels; value > 0 means 'inside'."""

    cell: float
    tissue: np.ndarray
    tumor: np.ndarray  # already shifted so that > 0 is tumor (within tissue)
    pen: np.ndarray
    fold: np.ndarray

    def stack(self) -> np.ndarray:
        return np.stack([self.tissue, self.tumor, self.pen, self.fold]).astype(np.float32)


@lru_cache(maxsize=8)
def slide_fields(width: int, height: int, tumor: float, seed: int, blank: bool = False) -> SlideFields:
    """The fields that define a slide's tissue, tumor, pen marks and folds (deterministic).

    `blank`: no tissue at all (an empty slide with only a pen mark).
    """
    if not 0.0 <= tumor <= 1.0:
        raise ValueError(f"tumor fraction {tumor} must lie in 0..1")
    rng = np.random.default_rng([seed, 7919])
    cell = max(width, height) / FIELD_CELLS
    gh, gw = int(np.ceil(height / cell)), int(np.ceil(width / cell))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
    yy, xx = (yy + 0.5) * cell, (xx + 0.5) * cell  # base-pixel coordinates of cell centres
    short = min(width, height)

    tissue = np.full((gh, gw), -1.0)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.14, 0.26, 2) * short
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
        tissue = np.maximum(tissue, 1.0 - np.sqrt(u * u + v * v))
    tissue = tissue + 0.22 * _smooth_noise(rng, (gh, gw), 5.0) + 0.1 * _smooth_noise(rng, (gh, gw), 2.0)
    if blank:
        tissue = np.full((gh, gw), -1.0)
    inside = tissue > 0

    tumor_raw = _smooth_noise(rng, (gh, gw), 9.0) + 0.3 * _smooth_noise(rng, (gh, gw), 3.0)
    if tumor <= 0 or not inside.any():
        tumor_field = np.full((gh, gw), -1.0)
    else:
        q = np.quantile(tumor_raw[inside], 1.0 - tumor)
        tumor_field = tumor_raw - q
        if tumor >= 1.0:
            tumor_field = np.maximum(tumor_field, 0.01)

    # pen: one band along a random line near a tissue border, ~0.6 mm wide
    ang = rng.uniform(0, np.pi)
    py, px = rng.uniform(0.15, 0.85) * height, rng.uniform(0.1, 0.9) * width
    dist = np.abs((xx - px) * np.sin(ang) - (yy - py) * np.cos(ang))
    along = np.abs((xx - px) * np.cos(ang) + (yy - py) * np.sin(ang))
    half_len = rng.uniform(0.1, 0.2) * short
    pen_w = max(min(0.3e3 / BASE_SPACING_UM, 0.025 * short), 1.5 * cell)
    pen = np.minimum(1.0 - dist / pen_w, 1.0 - along / half_len) + 0.08 * _smooth_noise(rng, (gh, gw), 2.0)

    # fold: a thin band of doubled tissue
    ang = rng.uniform(0, np.pi)
    fy, fx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.3, 0.7) * width
    dist = np.abs((xx - fx) * np.sin(ang) - (yy - fy) * np.cos(ang))
    fold = np.minimum(1.0 - dist / max(min(0.1e3 / BASE_SPACING_UM, 0.012 * short), 1.5 * cell), tissue * 4)
    return SlideFields(cell, tissue, tumor_field, pen, fold)


def _sample(field: np.ndarray, cell: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of a field at base-pixel coordinates (ys, xs broadcast together)."""
    fy, fx = np.broadcast_arrays(ys / cell - 0.5, xs / cell - 0.5)
    return ndimage.map_coordinates(field, [fy.ravel(), fx.ravel()], order=1, mode="nearest").reshape(fy.shape)


def _grid_centres(length: int, n: int, cell_size: float | None) -> np.ndarray:
    step = cell_size if cell_size else length / n
    return (np.arange(n) + 0.5) * step


def tissue_mask(width: int, height: int, seed: int, shape: tuple[int, int],
                cell_size: float | None = None) -> np.ndarray:
    """Known tissue (without pen marks) sampled at cell centres of a (rows, cols) grid.

    `cell_size` is the grid step in base pixels; by default the grid spans the slide exactly.
    """
    f = slide_fields(width, height, 0.0, seed)
    ys = _grid_centres(height, shape[0], cell_size)[:, None]
    xs = _grid_centres(width, shape[1], cell_size)[None, :]
    return (_sample(f.tissue, f.cell, ys, xs) > 0) & (_sample(f.pen, f.cell, ys, xs) <= 0)


def tumor_mask(width: int, height: int, tumor: float, seed: int, shape: tuple[int, int],
               cell_size: float | None = None) -> np.ndarray:
    """Known tumor (inside tissue, not under pen) sampled at cell centres of a (rows, cols) grid."""
    f = slide_fields(width, height, tumor, seed)
    ys = _grid_centres(height, shape[0], cell_size)[:, None]
    xs = _grid_centres(width, shape[1], cell_size)[None, :]
    t = _sample(f.tissue, f.cell, ys, xs) > 0
    u = _sample(f.tumor, f.cell, ys, xs) > 0
    p = _sample(f.pen, f.cell, ys, xs) > 0
    return t & u & ~p


# ----------------------------------------------------------------------------- textures

BANK = 8  # textures per class and level


def _render_texture(rng: np.random.Generator, spacing: float, tumor: bool) -> np.ndarray:
    size = TILE
    area_um2 = (size * spacing) ** 2
    base = TUMOR_STROMA if tumor else STROMA
    fib = _smooth_noise(rng, (size, size), max(0.6, 3.0 / spacing))
    img = base[None, None, :] + (fib[..., None] * np.array([6.0, 12.0, 8.0], np.float32))
    density = 1 / 55.0 if tumor else 1 / 170.0  # nuclei per um^2
    n = int(rng.poisson(area_um2 * density))
    r_um = rng.uniform(3.6, 6.0, n) if tumor else rng.uniform(2.2, 3.2, n)
    aspect = rng.uniform(0.55, 1.0, n) if tumor else rng.uniform(0.75, 1.0, n)
    theta = rng.uniform(0, np.pi, n)
    cy, cx = rng.uniform(0, size, n), rng.uniform(0, size, n)
    colour = TUMOR_NUCLEUS if tumor else NUCLEUS
    shade = rng.uniform(-18, 18, n) if tumor else rng.uniform(-10, 10, n)
    if spacing >= 1.5:  # nuclei of a pixel or two: splat their area, blur slightly
        cover = np.zeros((size, size))
        np.add.at(cover, (cy.astype(int), cx.astype(int)), np.pi * r_um**2 * aspect / spacing**2)
        alpha = np.clip(ndimage.gaussian_filter(cover, 0.6), 0, 1)[..., None]
        return np.clip(img + alpha * (colour - img), 0, 255).astype(np.uint8)
    for i in range(n):
        ra, rb = r_um[i] / spacing, r_um[i] * aspect[i] / spacing
        rr = int(np.ceil(ra)) + 1
        y0, y1 = max(int(cy[i]) - rr, 0), min(int(cy[i]) + rr + 1, size)
        x0, x1 = max(int(cx[i]) - rr, 0), min(int(cx[i]) + rr + 1, size)
        if y1 <= y0 or x1 <= x0:
            continue
        dy = np.arange(y0, y1)[:, None] + 0.5 - cy[i]
        dx = np.arange(x0, x1)[None, :] + 0.5 - cx[i]
        c, s = np.cos(theta[i]), np.sin(theta[i])
        u, v = (dx * c + dy * s) / max(ra, 0.35), (-dx * s + dy * c) / max(rb, 0.3)
        d = u * u + v * v
        if tumor:  # irregular outline
            d = d * (1 + 0.25 * np.sin(3 * np.arctan2(v, u) + theta[i]))
        alpha = np.clip((1.3 - d) / 0.6, 0, 1) * min(1.0, 2 * ra * rb)  # sub-pixel nuclei fade
        patch = img[y0:y1, x0:x1]
        patch += alpha[..., None] * (colour + shade[i] - patch)
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=16)
def texture_bank(seed: int, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(normal, tumor) banks of shape (BANK, 4 rotations, 256, 256, 3) at the level's spacing."""
    spacing = BASE_SPACING_UM * 2**level
    rng = np.random.default_rng([seed, level, 104729])
    normal = [_render_texture(rng, spacing, False) for _ in range(BANK)]
    tumor = [_render_texture(rng, spacing, True) for _ in range(BANK)]

    def rotations(textures: list[np.ndarray]) -> np.ndarray:  # contiguous, for fast copies
        return np.stack([np.stack([np.ascontiguousarray(np.rot90(t, k)) for k in range(4)])
                         for t in textures])

    return rotations(normal), rotations(tumor)


# ----------------------------------------------------------------------------- tiles

_STEP = 8  # fields are sampled every 8 px in a tile and bilinearly upsampled


_FINE = 4  # masks are evaluated every 4 px and repeated (a 1-um staircase at the base level)


@lru_cache(maxsize=1)
def _upsampler() -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation from the _STEP grid to the _FINE grid."""
    n = TILE // _STEP + 1
    pos = (np.arange(TILE // _FINE) * _FINE + _FINE / 2) / _STEP
    i0 = np.minimum(np.floor(pos).astype(int), n - 2)
    return i0, (pos - i0).astype(np.float32)


def _upsample(coarse: np.ndarray) -> np.ndarray:
    """(c, n, n) samples every _STEP px -> (c, TILE/_FINE, TILE/_FINE), bilinear (no BLAS)."""
    i0, w = _upsampler()
    rows = coarse[:, i0, :] * (1 - w)[None, :, None] + coarse[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w


def _full(mask: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(mask, _FINE, axis=0), _FINE, axis=1)


def render_tile(width: int, height: int, tumor: float, seed: int, level: int,
                ty: int, tx: int, blank: bool = False) -> np.ndarray | None:
    """RGB uint8 tile (256x256) at pyramid `level`, tile row `ty`, column `tx`; None if background."""
    f = slide_fields(width, height, tumor, seed, blank)
    scale = 2**level
    n = TILE // _STEP + 1
    ys = (ty * TILE + np.arange(n) * _STEP) * scale
    xs = (tx * TILE + np.arange(n) * _STEP) * scale
    coarse = np.stack([_sample(fl, f.cell, ys[:, None], xs[None, :])
                       for fl in (f.tissue, f.tumor, f.pen, f.fold)])
    if coarse[0].max() <= 0 and coarse[2].max() <= 0:
        return None
    t, u, p, fo = _upsample(coarse.astype(np.float32))

    rng = np.random.default_rng([seed, level, ty, tx, 31])
    normal_bank, tumor_bank = texture_bank(seed, level)
    a = normal_bank[rng.integers(BANK), rng.integers(4)]
    b = tumor_bank[rng.integers(BANK), rng.integers(4)]
    tissue = t > 0
    if tissue.all() and not (u > 0).any():
        img = a.copy()
    else:
        img = np.empty((TILE, TILE, 3), np.uint8)
        img[:] = BACKGROUND.astype(np.uint8)
        np.copyto(img, a, where=_full(tissue)[..., None])
        tum = tissue & (u > 0)
        if tum.any():
            np.copyto(img, b, where=_full(tum)[..., None])
    fold = tissue & (fo > 0)
    if fold.any():
        darker = (img * np.array([0.78, 0.72, 0.82], np.float32)).astype(np.uint8)
        np.copyto(img, darker, where=_full(fold)[..., None])
    if (p > 0).any():
        alpha = _full(np.clip(p * 6, 0, 0.85))[..., None]
        img = (img * (1 - alpha) + INKS[seed % 2] * alpha).astype(np.uint8)
    return img


def encode_frame(rgb: np.ndarray, codec: str) -> bytes:
    if codec == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=88, subsampling=1)  # 4:2:2
        return buf.getvalue()
    if codec == "jpeg2000":
        import imagecodecs

        return bytes(imagecodecs.jpeg2k_encode(rgb, level=40, codecformat="J2K", reversible=False, mct=True))
    raise ValueError(f"codec {codec!r} is not one of jpeg, jpeg2000")


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(rgb, np.float32) + 1.0) / 256.0)


# "ihc": stroma as DAB brown, nuclei as hematoxylin blue (an immunohistochemistry look): the
# phantom's two stain colours (optical densities) mapped linearly onto those two
_IHC = (_od(np.array([[165, 115, 75], [70, 80, 150]])).T
        @ np.linalg.pinv(_od(np.stack([STROMA, NUCLEUS])).T)).astype(np.float32)


def restain(rgb: np.ndarray, stain: tuple[float, float, float] | str | None) -> np.ndarray:
    """The tile as another staining would show it (Beer-Lambert: the stain's optical density,
    above that of the bare glass, scales; the glass stays as it is).

    `stain`: None (as rendered); three factors for the red, green and blue optical density
    (lab-to-lab H&E variation: (1.5, 1.3, 1.4) is a darker, bluer H&E); or "ihc".
    """
    if stain is None:
        return rgb
    glass = _od(BACKGROUND)
    od = np.maximum(_od(rgb) - glass, 0.0)
    od = od @ _IHC.T if isinstance(stain, str) else od * np.asarray(stain, np.float32)
    return np.clip(256.0 * np.exp(-(od + glass)) - 1.0, 0, 255).round().astype(np.uint8)


def _encode_tile(args: tuple) -> bytes | None:
    width, height, tumor, seed, level, ty, tx, codec, blank, stain = args
    rgb = render_tile(width, height, tumor, seed, level, ty, tx, blank)
    return None if rgb is None else encode_frame(restain(rgb, stain), codec)


# ----------------------------------------------------------------------------- DICOM

TRANSFER_SYNTAX = {"jpeg": JPEGBaseline8Bit, "jpeg2000": JPEG2000}
PHOTOMETRIC = {"jpeg": "YBR_FULL_422", "jpeg2000": "YBR_ICT"}
COMPRESSION_METHOD = {"jpeg": "ISO_10918_1", "jpeg2000": "ISO_15444_1"}


@lru_cache(maxsize=1)
def _icc_profile() -> bytes:
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    # fixed creation date (header bytes 24-35) and no profile ID (84-99): same bytes every run
    icc[24:36] = struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
    icc[84:100] = bytes(16)
    return bytes(icc)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _base_dataset(seed: int, patient_name: str | None, codec: str) -> Dataset:
    ds = Dataset()
    now = _dt.datetime(2024, 1, 1, 8, 0, 0) + _dt.timedelta(minutes=seed % 1000)
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient_name or f"PHANTOM^WSI-{seed}"
    ds.PatientID = f"PHANTOM-WSI-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid("study", seed)
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"PHWSI{seed}"[:16]
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"W{seed}"[:16]
    ds.StudyDescription = "Synthetic H&E slide (phantom)"
    ds.SeriesInstanceUID = _uid("series", seed)
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Phantom H&E whole slide"
    ds.Modality = "SM"
    ds.FrameOfReferenceUID = _uid("for", seed)
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Manufacturer = "befund"
    ds.ManufacturerModelName = "wsi-phantom"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "1.0"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.ContainerIdentifier = f"SLIDE-{seed}"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier = f"SPECIMEN-{seed}"
    spec.SpecimenUID = _uid("specimen", seed)
    spec.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    spec.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([spec])
    op = Dataset()
    op.OpticalPathIdentifier = "1"
    op.IlluminationTypeCodeSequence = DicomSequence([_code("111744", "DCM", "Brightfield illumination")])
    op.IlluminationColorCodeSequence = DicomSequence([_code("11744", "DCM", "Full Spectrum")])
    op.ICCProfile = _icc_profile()
    ds.OpticalPathSequence = DicomSequence([op])
    ds.NumberOfOpticalPaths = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = PHOTOMETRIC[codec]
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = COMPRESSION_METHOD[codec]
    ds.LossyImageCompressionRatio = 10 if codec == "jpeg" else 40
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    return ds


def _frame_groups(ds: Dataset, spacing_um: float, frame_type: str) -> None:
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [round(spacing_um / 1000, 10), round(spacing_um / 1000, 10)]
    pm.SliceThickness = 0.004
    shared.PixelMeasuresSequence = DicomSequence([pm])
    ft = Dataset()
    ft.FrameType = frame_type.split("\\")
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([ft])
    oid = Dataset()
    oid.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = DicomSequence([oid])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])


ORIGIN_MM = (20.0, 40.0)  # slide coordinates of the total pixel matrix's top left corner


def _plane_position(row: int, col: int, spacing_um: float) -> Dataset:
    # ImageOrientationSlide [0,-1,0,-1,0,0]: columns run along -Y, rows along -X
    pp = Dataset()
    pp.XOffsetInSlideCoordinateSystem = round(ORIGIN_MM[0] - (row - 1) * spacing_um / 1000, 6)
    pp.YOffsetInSlideCoordinateSystem = round(ORIGIN_MM[1] - (col - 1) * spacing_um / 1000, 6)
    pp.ZOffsetInSlideCoordinateSystem = 0.0
    pp.ColumnPositionInTotalImagePixelMatrix = col
    pp.RowPositionInTotalImagePixelMatrix = row
    return pp


def _geometry(ds: Dataset, cols: int, rows: int, spacing_um: float) -> None:
    ds.TotalPixelMatrixColumns = cols
    ds.TotalPixelMatrixRows = rows
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.ImagedVolumeWidth = round(cols * spacing_um / 1000, 6)
    ds.ImagedVolumeHeight = round(rows * spacing_um / 1000, 6)
    ds.ImagedVolumeDepth = 0.004
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = ORIGIN_MM[0]
    origin.YOffsetInSlideCoordinateSystem = ORIGIN_MM[1]
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])


def _dimensions(ds: Dataset, tiling: str, seed: int) -> None:
    ds.DimensionOrganizationType = "TILED_FULL" if tiling == "full" else "TILED_SPARSE"
    org_uid = _uid("dim", seed)
    org = Dataset()
    org.DimensionOrganizationUID = org_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    idx = []
    for tag, label in ((0x0048021E, "Column Position"), (0x0048021F, "Row Position")):
        d = Dataset()
        d.DimensionOrganizationUID = org_uid
        d.DimensionIndexPointer = tag
        d.FunctionalGroupPointer = 0x0048021A  # PlanePositionSlideSequence
        d.DimensionDescriptionLabel = label
        idx.append(d)
    ds.DimensionIndexSequence = DicomSequence(idx)


def _write_instance(path: Path, ds: Dataset, frames: Iterator[bytes], n_frames: int,
                    offset_table: str) -> None:
    """Write the header with pydicom, then stream the encapsulated frames (one item each)."""
    ds.NumberOfFrames = n_frames
    if offset_table == "extended":
        ds.ExtendedOffsetTable = b"\0" * (8 * n_frames)
        ds.ExtendedOffsetTableLengths = b"\0" * (8 * n_frames)
    with open(path, "wb") as fp:
        dcmwrite(fp, ds, enforce_file_format=True)
        header_end = fp.tell()
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        bot_len = 4 * n_frames if offset_table == "basic" else 0
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, bot_len))
        bot_at = fp.tell()
        fp.write(b"\0" * bot_len)
        first = fp.tell()
        offsets, lengths = [], []
        count = 0
        for data in frames:
            if len(data) % 2:
                data = data + b"\0"
            offsets.append(fp.tell() - first)
            lengths.append(len(data))  # item length (even), as the EOT lengths give it
            fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
            fp.write(data)
            count += 1
        if count != n_frames:
            raise RuntimeError(f"{path}: wrote {count} frames, header says {n_frames}")
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        if offset_table == "basic":
            if offsets and offsets[-1] >= 2**32:
                raise ValueError(f"{path}: frames exceed 4 GiB; use offset_table='extended'")
            fp.seek(bot_at)
            fp.write(struct.pack(f"<{n_frames}I", *offsets))
        elif offset_table == "extended":
            fp.seek(header_end - 8 * n_frames)
            fp.write(struct.pack(f"<{n_frames}Q", *lengths))
            fp.seek(header_end - 8 * n_frames - 12 - 8 * n_frames)
            fp.write(struct.pack(f"<{n_frames}Q", *offsets))


def pyramid_sizes(width: int, height: int, smallest_px: int = THUMBNAIL_MAX) -> list[tuple[int, int]]:
    """(cols, rows) per level: halve until the longer side is at most `smallest_px`."""
    sizes = [(width, height)]
    while max(sizes[-1]) > max(smallest_px, 1):
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def _file_meta(ds: Dataset, ts: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = UID_ROOT + "1"
    meta.ImplementationVersionName = "BEFUND_PHANTOM"
    ds.file_meta = meta


def write_wsi_slide(out: Path, width: int, height: int, tumor: float, seed: int,
                    tiling: str = "full", codec: str = "jpeg", label: bool = False,
                    overview: bool = False, patient_name: str | None = None,
                    offset_table: str = "basic", workers: int = 0, tissue: bool = True,
                    smallest_px: int = THUMBNAIL_MAX,
                    stain: tuple[float, float, float] | str | None = None) -> list[Path]:
    """Write a phantom slide (one instance per level, plus LABEL/OVERVIEW) into folder `out`.

    tiling: "full" (TILED_FULL) or "sparse" (TILED_SPARSE: per-frame positions, column-major order);
    codec: "jpeg" (baseline, YBR_FULL_422) or "jpeg2000" / "j2k" (lossy, YBR_ICT);
    offset_table: "basic" (filled Basic Offset Table), "none" (empty BOT) or "extended"
    (Extended Offset Table, empty BOT); workers > 1 renders and encodes tiles in processes;
    tissue=False writes an empty slide (glass and a pen mark only); smallest_px: the pyramid
    halves until the longer side is at most this (1: down to 1 x 1 px, as some converters do);
    stain: see `restain` (None: the phantom's own H&E).
    """
    if isinstance(stain, str) and stain != "ihc":
        raise ValueError(f"stain {stain!r} is not 'ihc' or three optical density factors")
    if tiling not in ("full", "sparse"):
        raise ValueError(f"tiling {tiling!r} is not one of full, sparse")
    codec = {"j2k": "jpeg2000"}.get(codec, codec)
    if codec not in TRANSFER_SYNTAX:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(TRANSFER_SYNTAX)}")
    if offset_table not in ("basic", "none", "extended"):
        raise ValueError(f"offset_table {offset_table!r} is not one of basic, none, extended")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for level, (cols, rows) in enumerate(pyramid_sizes(width, height, smallest_px)):
            spacing = BASE_SPACING_UM * 2**level
            ds = _base_dataset(seed, patient_name, codec)
            ds.SOPInstanceUID = _uid("level", seed, level, width, height, tumor, tiling, codec, tissue,
                                     *(() if stain is None else ("stain", stain)))
            ds.InstanceNumber = level + 1
            ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0
                            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
            ds.Rows = ds.Columns = TILE
            _geometry(ds, cols, rows, spacing)
            _frame_groups(ds, spacing, "\\".join(ds.ImageType))
            _dimensions(ds, tiling, seed)
            _file_meta(ds, TRANSFER_SYNTAX[codec])
            nty, ntx = -(-rows // TILE), -(-cols // TILE)
            grid = [(ty, tx) for ty in range(nty) for tx in range(ntx)]
            if tiling == "sparse":
                # every tile, listed column by column: readers must use the per-frame positions
                grid = sorted(grid, key=lambda t: (t[1], t[0]))
                ds.PerFrameFunctionalGroupsSequence = DicomSequence([
                    _per_frame(ty * TILE + 1, tx * TILE + 1, spacing) for ty, tx in grid])
            frames = _frames(width, height, tumor, seed, level, grid, codec, pool, not tissue, stain)
            path = out / f"level-{level}.dcm"
            _write_instance(path, ds, frames, len(grid), offset_table)
            paths.append(path)
    finally:
        if pool:
            pool.shutdown()
    if label:
        paths.append(_write_associated(out, "LABEL", seed, patient_name, codec, width, height, tumor))
    if overview:
        paths.append(_write_associated(out, "OVERVIEW", seed, patient_name, codec, width, height, tumor,
                                       not tissue))
    return paths


def _per_frame(row: int, col: int, spacing: float) -> Dataset:
    item = Dataset()
    item.PlanePositionSlideSequence = DicomSequence([_plane_position(row, col, spacing)])
    return item


def _content_grid(f: SlideFields, level: int, nty: int, ntx: int) -> np.ndarray:
    """(nty, ntx) bool: tiles that may hold tissue or ink (conservative: any positive field cell
    within the tile's bilinear support, plus one cell of margin). Other tiles are plain glass."""
    pos = ((f.tissue > 0) | (f.pen > 0)).astype(np.int64)
    integral = np.zeros((pos.shape[0] + 1, pos.shape[1] + 1), np.int64)
    integral[1:, 1:] = pos.cumsum(0).cumsum(1)
    span = TILE * 2**level / f.cell

    def bounds(n: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(np.arange(n) * span - 0.5).astype(int) - 1, 0, limit)
        hi = np.clip(np.ceil((np.arange(n) + 1) * span - 0.5).astype(int) + 2, 0, limit)
        return lo, hi

    y0, y1 = bounds(nty, pos.shape[0])
    x0, x1 = bounds(ntx, pos.shape[1])
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return total > 0


def _frames(width: int, height: int, tumor: float, seed: int, level: int,
            grid: list[tuple[int, int]], codec: str, pool: ProcessPoolExecutor | None,
            blank: bool, stain: tuple[float, float, float] | str | None = None) -> Iterator[bytes]:
    glass = encode_frame(restain(np.broadcast_to(BACKGROUND.astype(np.uint8), (TILE, TILE, 3)).copy(), stain),
                         codec)
    nty = max(ty for ty, _ in grid) + 1
    ntx = max(tx for _, tx in grid) + 1
    content = _content_grid(slide_fields(width, height, tumor, seed, blank), level, nty, ntx)
    wanted = [(ty, tx) for ty, tx in grid if content[ty, tx]]
    jobs = ((width, height, tumor, seed, level, ty, tx, codec, blank, stain) for ty, tx in wanted)
    results = pool.map(_encode_tile, jobs, chunksize=64) if pool else map(_encode_tile, jobs)
    for ty, tx in grid:
        data = next(results) if content[ty, tx] else None
        yield glass if data is None else data


def _write_associated(out: Path, kind: str, seed: int, patient_name: str | None, codec: str,
                      width: int, height: int, tumor: float, blank: bool = False) -> Path:
    """A single-frame LABEL (synthetic barcode) or OVERVIEW (macro view of the whole slide)."""
    ds = _base_dataset(seed, patient_name, codec)
    ds.SOPInstanceUID = _uid(kind, seed, width, height, tumor, codec)
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
    ds.InstanceNumber = 100 if kind == "LABEL" else 101
    ds.SpecimenLabelInImage = "YES"
    if kind == "LABEL":
        rgb = np.full((256, 512, 3), 250, np.uint8)
        rng = np.random.default_rng([seed, 5])
        bars = rng.integers(0, 2, 64).astype(bool)
        for i, b in enumerate(bars):
            if b:
                rgb[40:200, 64 + 6 * i: 64 + 6 * i + 4] = 20
        ds.BarcodeValue = f"PHWSI{seed}"
        ds.LabelText = f"PHANTOM SLIDE {seed}"
        ds.BurnedInAnnotation = "YES"
        spacing = 50.0
    else:
        cols = 1024
        rows = max(16, int(round(cols * height / width)) // 16 * 16)
        f = slide_fields(width, height, tumor, seed, blank)
        ys = (np.arange(rows) + 0.5) * height / rows
        xs = (np.arange(cols) + 0.5) * width / cols
        t = _sample(f.tissue, f.cell, ys[:, None], xs[None, :]) > 0
        p = _sample(f.pen, f.cell, ys[:, None], xs[None, :]) > 0
        rgb = np.empty((rows, cols, 3), np.uint8)
        rgb[:] = BACKGROUND.astype(np.uint8)
        rgb[t] = (STROMA * 0.9).astype(np.uint8)
        rgb[p] = INKS[seed % 2].astype(np.uint8)
        spacing = BASE_SPACING_UM * width / cols
    rows, cols = rgb.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    _geometry(ds, cols, rows, spacing)
    _frame_groups(ds, spacing, "\\".join(ds.ImageType))
    _dimensions(ds, "full", seed)
    _file_meta(ds, TRANSFER_SYNTAX[codec])
    path = out / f"{kind.lower()}.dcm"
    _write_instance(path, ds, iter([encode_frame(rgb, codec)]), 1, "basic")
    return path


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    ap = argparse.ArgumentParser(description="write a phantom whole-slide image")
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--height", type=int, default=6144)
    ap.add_argument("--tumor", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tiling", default="full")
    ap.add_argument("--codec", default="jpeg")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    for p in write_wsi_slide(a.out, a.width, a.height, a.tumor, a.seed, a.tiling, a.codec,
                             label=True, overview=True, workers=a.workers):
        print(p)
