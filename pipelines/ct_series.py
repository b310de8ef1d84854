"""Load a CT series from spooled files: check it is one axial stack, sort it, decode it to HU.

Headers are read first (cheap) and checked against the model card's slice requirements and
its validated domain (pipelines.domain), so a series that cannot be analysed is refused before
any pixel is decoded. Gantry-tilted stacks (oblique ImageOrientationPatient, table moving along
z) are accepted: their in-plane shear is measured from ImagePositionPatient (`stack_geometry`)
and corrected on the model's input (`deshear`). Decoding can run in
worker processes: pass a `concurrent.futures.Executor` (a ProcessPoolExecutor) and the paths
are decoded in chunks, one chunk per task, so each task is worth the inter-process hop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from pipelines.domain import CtHeaderFacts, check_ct_headers, check_slice_spacing, check_slice_thickness
from pipelines.findings import NotAnalysable
from pipelines.model_card import CtPreprocessing, ValidatedDomain

ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE_MM = 1e-3
DUPLICATE_POSITION_MM = 1e-2
MAX_CHUNK_SLICES = 32  # a decode worker holds one chunk as float32 HU: 32 x 512 x 512 is 32 MB
SHEAR_MIN_PX = 0.05  # in-plane offsets below this (model pixels) are not resampled
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "PixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept",
    "NumberOfFrames", "SamplesPerPixel", "SliceThickness", "KVP", "ConvolutionKernel",
    "BodyPartExamined", "ContrastBolusAgent",
]


@dataclass(frozen=True)
class SliceHeader:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    slope: float
    intercept: float
    transfer_syntax: str
    slice_thickness: float | None = None
    kvp: float | None = None
    kernel: str = ""
    body_part: str = ""
    contrast_agent: bool = False


@dataclass(frozen=True)
class CtSeries:
    """One sorted axial stack: `hu[i]` is slice i along the normal (inferior to superior for HFS)."""

    hu: np.ndarray  # (N, H, W) int16 when the rescale is integral, else float32 (or the transform's output)
    headers: tuple[SliceHeader, ...]
    positions_mm: np.ndarray  # (N,) position of each slice along the stack normal
    pixel_spacing: tuple[float, float]
    # (N, 2) in-plane offset (along columns, along rows; mm) of each slice's origin from the
    # first slice's, seen along the normal: not zero when the gantry was tilted (`deshear`)
    inplane_offsets_mm: np.ndarray | None = None
    tilt_deg: float = 0.0  # angle between the slice normal and the direction the stack advances

    @property
    def series_uid(self) -> str:
        return self.headers[0].series_uid

    @property
    def slice_gap_mm(self) -> float:
        return float(np.median(np.diff(self.positions_mm))) if len(self.headers) > 1 else 0.0


def _short(uid: str) -> str:
    return uid or "(no UID)"


def _number(value: object) -> float | None:
    """A DS/IS header value as a float, or None where it is absent, empty or not a number."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def stack_geometry(headers: Sequence[SliceHeader]) -> tuple[np.ndarray, float]:
    """In-plane offsets (mm, along columns and rows) of each sorted slice's origin relative to
    the first, and the tilt in degrees between the slice normal and the stack's direction.

    A gantry-tilted head CT keeps every slice in one oblique plane orientation while the table
    moves along z, so each slice is shifted in its own plane against the last one (18.5 degrees
    and 4 mm steps: 1.3 mm per slice). Zero offsets for an ordinary axial stack.
    """
    orient = np.array(headers[0].orientation, np.float64)
    row, col = orient[:3], orient[3:]
    delta = np.array([h.position for h in headers], np.float64) - np.array(headers[0].position)
    offsets = np.stack([delta @ row, delta @ col], axis=1)
    travel = delta[-1] if len(delta) > 1 else np.zeros(3)
    length = float(np.linalg.norm(travel))
    if length < 1e-6:
        return offsets, 0.0
    normal = np.cross(row, col)
    cosine = abs(float(travel @ normal)) / (length * float(np.linalg.norm(normal)))
    return offsets, float(np.degrees(np.arccos(min(cosine, 1.0))))


def deshear(stack: np.ndarray, offsets_mm: np.ndarray, pixel_mm: tuple[float, float],
            fill: float = 0.0) -> np.ndarray:
    """Shift each slice of an (N, ..., H, W) stack in its plane so that pixel (r, c) lines up
    along the slice normal (shear correction of a gantry-tilted series; linear interpolation).

    `offsets_mm` are stack_geometry's (along columns, along rows); `pixel_mm` is the stack's
    (row spacing, column spacing) in mm, i.e. of the array given (after any resize).
    """
    from scipy import ndimage

    shifts = np.asarray(offsets_mm, np.float64)[:, ::-1] / np.asarray(pixel_mm, np.float64)
    if not len(shifts) or np.abs(shifts).max() < SHEAR_MIN_PX:
        return stack
    out = np.empty_like(stack)
    lead = (0.0,) * (stack.ndim - 3)
    integral = np.issubdtype(stack.dtype, np.integer)
    for k, (dy, dx) in enumerate(shifts):
        moved = ndimage.shift(stack[k].astype(np.float32, copy=False), (*lead, dy, dx), order=1,
                              mode="constant", cval=fill)
        out[k] = np.rint(moved) if integral else moved
    return out


def reshear_masks(masks: dict[int, np.ndarray], offsets_mm: np.ndarray,
                  pixel_mm: tuple[float, float]) -> dict[int, np.ndarray]:
    """`deshear`'s inverse for masks found on a deshorn stack: move each slice's mask back onto
    the slice as stored (nearest neighbour), so that a SEG and a key image outline the pixels
    the model saw, not pixels shifted by the tilt. `pixel_mm` is the masks' own spacing."""
    from scipy import ndimage

    shifts = np.asarray(offsets_mm, np.float64)[:, ::-1] / np.asarray(pixel_mm, np.float64)
    if not len(shifts) or np.abs(shifts).max() < SHEAR_MIN_PX:
        return masks
    out = {}
    for k, mask in masks.items():
        dy, dx = shifts[k]
        moved = ndimage.shift(mask.astype(np.uint8), (-dy, -dx), order=0, mode="constant", cval=0) > 0
        if moved.any():
            out[k] = moved
    return out


def read_header(path: str | Path) -> SliceHeader:
    """The header fields the stack checks need; refuses files that are not single-frame images."""
    path = str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise NotAnalysable(f"file {Path(path).name} is not a readable DICOM file: {exc}") from exc
    series = _short(str(ds.get("SeriesInstanceUID", "")))
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows")
               if t not in ds]
    if missing:
        raise NotAnalysable(
            f"series {series} not analysed: instance {ds.get('SOPInstanceUID', '?')} lacks "
            f"{', '.join(missing)}; it is not a cross-sectional image")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotAnalysable(f"series {series} not analysed: multi-frame (enhanced) CT is not supported; "
                            "send the series as single-frame CT Image Storage")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise NotAnalysable(f"series {series} not analysed: colour images are not CT slices")
    return SliceHeader(
        path=path,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_uid=series,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
        position=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
        slope=float(ds.get("RescaleSlope", 1) or 1),
        intercept=float(ds.get("RescaleIntercept", 0) or 0),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        slice_thickness=_number(ds.get("SliceThickness")),
        kvp=_number(ds.get("KVP")),
        kernel=str(ds.get("ConvolutionKernel", "") or "").strip(),
        body_part=str(ds.get("BodyPartExamined", "") or "").strip(),
        contrast_agent=bool(str(ds.get("ContrastBolusAgent", "") or "").strip()),
    )


def sort_stack(headers: Sequence[SliceHeader], pre: CtPreprocessing, model: str = "the model",
               domain: ValidatedDomain | None = None) -> tuple[list[SliceHeader], np.ndarray]:
    """Check the headers form one axial stack the model can take; return them sorted, with positions.

    `model` names the model in reasons ("the ich_ct model needs at least 16"). With the card's
    `domain`, its explicit header checks run here, before any pixel is decoded, and slice
    spacing is judged against its validated range instead of `pre.max_slice_gap_mm`.
    """
    if not headers:
        raise NotAnalysable("series not analysed: no instances were given")
    first = headers[0]
    series = first.series_uid
    if len({h.series_uid for h in headers}) > 1:
        raise NotAnalysable(f"series {series} not analysed: the instances belong to "
                            f"{len({h.series_uid for h in headers})} different series")
    n = len(headers)
    if n < pre.min_slices:
        noun = "slice" if n == 1 else "slices"
        raise NotAnalysable(f"series {series} not analysed: {n} {noun}, {model} needs at least "
                            f"{pre.min_slices}")
    orient = np.array([h.orientation for h in headers])
    if np.abs(orient - orient[0]).max() > ORIENTATION_TOLERANCE:
        kinds = len({tuple(np.round(o, 3)) for o in orient})
        raise NotAnalysable(f"series {series} not analysed: mixed image orientations ({kinds} different); "
                            "the model needs one stack of parallel slices (a localizer or reformat "
                            "may be mixed in)")
    if len({(h.rows, h.columns) for h in headers}) > 1:
        raise NotAnalysable(f"series {series} not analysed: slices have different matrix sizes")
    spacing = np.array([h.pixel_spacing for h in headers])
    if np.abs(spacing - spacing[0]).max() > SPACING_TOLERANCE_MM:
        raise NotAnalysable(f"series {series} not analysed: slices have different pixel spacings")
    row, col = orient[0, :3], orient[0, 3:]
    normal = np.cross(row, col)
    if abs(normal[2]) < math.cos(math.radians(30)):
        raise NotAnalysable(f"series {series} not analysed: slices are not axial (normal {normal.round(2)}); "
                            "the model takes axial head CT")
    pos = np.array([h.position for h in headers]) @ normal
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    steps = np.diff(pos)
    if len(steps) and steps.min() < DUPLICATE_POSITION_MM:
        k = int(np.argmin(steps))
        raise NotAnalysable(f"series {series} not analysed: two slices at the same position "
                            f"({pos[k]:.1f} mm); duplicates or two acquisitions in one series")
    ordered = [headers[i] for i in order]
    subject = f"series {series}"
    if domain is not None:
        check_slice_thickness(domain, [h.slice_thickness for h in ordered], subject, model)
        check_ct_headers(domain, CtHeaderFacts(
            kvp=ordered[0].kvp, kernel=ordered[0].kernel, body_part=ordered[0].body_part,
            contrast_agent=any(h.contrast_agent for h in ordered),
            pixel_spacing_mm=float(min(ordered[0].pixel_spacing))), subject, model)
        if domain.slice_spacing_mm is not None:
            check_slice_spacing(domain, pos, subject, model)
            return ordered, pos
    if len(steps) and steps.max() > pre.max_slice_gap_mm:
        k = int(np.argmax(steps))
        raise NotAnalysable(f"series {series} not analysed: a {steps[k]:.1f} mm gap between slices at "
                            f"{pos[k]:.1f} and {pos[k + 1]:.1f} mm (at most {pre.max_slice_gap_mm:g} mm "
                            "allowed); slices are missing")
    return ordered, pos


def _rescale_is_integral(headers: Sequence[SliceHeader]) -> bool:
    return all(h.slope == 1.0 and float(h.intercept).is_integer() for h in headers)


def decode_chunk(items: Sequence[tuple[str, float, float, str]], integral: bool,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Decode (path, slope, intercept, syntax) items to a (k, H, W) HU array. Runs in a worker.

    With `transform`, return transform(HU) instead (e.g. windowed and resized: less to send back).
    """
    out = []
    for path, slope, intercept, syntax in items:
        try:
            raw = pixel_array(path)
        except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a reason
            name = pydicom.uid.UID(syntax).name if syntax else "an unknown transfer syntax"
            raise NotAnalysable(f"could not decode {Path(path).name} ({name}): {exc}") from exc
        if integral:
            out.append(np.clip(raw.astype(np.int32) + int(intercept), -32768, 32767).astype(np.int16))
        else:
            out.append((raw.astype(np.float32) * slope + intercept).astype(np.float32))
    try:
        hu = np.stack(out)
    except ValueError as exc:
        raise NotAnalysable(f"decoded slices differ in shape ({exc})") from exc
    return hu if transform is None else transform(hu)


def load_ct_series(paths: Sequence[str | Path], pre: CtPreprocessing, executor: Executor | None = None,
                   chunk_size: int | None = None,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None,
                   model: str = "the model", domain: ValidatedDomain | None = None) -> CtSeries:
    """Read, check, sort and decode a series; raise NotAnalysable with a radiographer's reason.

    `transform` (picklable, e.g. a functools.partial of a module-level function) runs on each
    decoded (k, H, W) chunk where it was decoded, in the worker when there is an executor;
    `CtSeries.hu` then holds the concatenated transformed chunks instead of HU. The stack is
    returned as stored; a tilted one carries its offsets for `deshear`.
    """
    headers, pos = sort_stack([read_header(p) for p in paths], pre, model, domain)
    integral = _rescale_is_integral(headers)
    items = [(h.path, h.slope, h.intercept, h.transfer_syntax) for h in headers]
    try:
        if executor is None:
            chunks = [decode_chunk(items, integral, transform)]
        else:
            size = chunk_size or min(MAX_CHUNK_SLICES, max(8, math.ceil(len(items) / 8)))
            futures = [executor.submit(decode_chunk, items[i:i + size], integral, transform)
                       for i in range(0, len(items), size)]
            chunks = [f.result() for f in futures]
    except NotAnalysable as exc:
        raise NotAnalysable(f"series {headers[0].series_uid} not analysed: {exc}") from exc
    try:
        hu = np.concatenate(chunks)
    except ValueError as exc:
        raise NotAnalysable(f"series {headers[0].series_uid} not analysed: decoded slices differ in "
                            f"shape ({exc})") from exc
    if transform is None and hu.shape[1:] != (headers[0].rows, headers[0].columns):
        raise NotAnalysable(f"series {headers[0].series_uid} not analysed: pixel data shape {hu.shape[1:]} "
                            f"does not match Rows x Columns {headers[0].rows} x {headers[0].columns}")
    offsets, tilt = stack_geometry(headers)
    return CtSeries(hu=hu, headers=tuple(headers), positions_mm=pos, pixel_spacing=headers[0].pixel_spacing,
                    inplane_offsets_mm=offsets, tilt_deg=tilt)
