"""Segmentation of a CT stack and the volume it encloses: pure numpy, the model injected.

`infer` takes an (n, C, H, W) float32 batch (the same 2.5D tensor as CT triage: windows x
neighbour slices, `ct_preprocess.add_context`, cropped to the body's bounding box: on a head
CT 40 % of the grid, 2.5x less work) and returns (n, 1, H, W) logits, one per pixel. The
probabilities are brought back to the source matrix (bilinear, only around the pixels above
the threshold; the padding `window_resize` added to square the slice cut off again) and
thresholded there, so the mask lines up pixel for pixel with the slices a DICOM SEG references.

Only slices with at least one voxel above the threshold keep a mask (`SliceMasks.masks`), so
a 1000-slice head with a small bleed holds a few dozen 512 x 512 masks, not a 262 MB stack.
The volume is voxels x row spacing x column spacing x slice spacing (the distance between
slice centres, not the slice thickness: overlapping reconstructions would count twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.ct_preprocess import add_context, window_resize

Infer = Callable[[np.ndarray], np.ndarray]
MM3_PER_ML = 1000.0
LEVELS = 255  # windowed values are kept as uint8: 1/255 of a window (0.3 HU in an 80 HU window)
STRIDE = 16  # the segmentation model's input size must be a multiple of its total downsampling
MARGIN = 16  # model pixels of air kept around the body when a batch is cropped to it


def window_u8(hu: np.ndarray, windows: tuple[tuple[float, float], ...], size: int) -> np.ndarray:
    """(N, H, W) HU -> (N, n_windows, size, size) uint8, window_resize quantised to 0..255.

    A quarter of float32's memory (a 1000-slice head at 256 x 256 is 197 MB, not 786 MB), and
    what the segmentation model was trained on (models/ich_seg/train.py stores the same).
    """
    return np.rint(window_resize(hu, windows, size) * LEVELS).astype(np.uint8)


def u8_slice_mean_features(compute: Callable[..., np.ndarray], windowed: np.ndarray,
                           windows: Sequence[tuple[float, float]], chunk: int = 64) -> np.ndarray:
    """`compute` (a feature set whose features are means over slices, as the CT OOD features
    are) of a `window_u8` stack, chunk by chunk: a float copy of a 1000-slice stack would take
    786 MB; the chunks' means weighted by their slice counts are the stack's mean."""
    n = len(windowed)
    total = None
    for start in range(0, n, chunk):
        part = windowed[start:start + chunk].astype(np.float32) * np.float32(1.0 / LEVELS)
        value = np.asarray(compute(part, windows), dtype=np.float64) * len(part)
        total = value if total is None else total + value
    return total / n


@dataclass(frozen=True)
class SliceMasks:
    """The thresholded segmentation of a stack, kept sparse: the slices that hold any voxel."""

    shape: tuple[int, int, int]  # (N, rows, columns) of the source stack
    masks: dict[int, np.ndarray]  # slice index -> (rows, columns) bool, only non-empty slices
    max_probability: np.ndarray  # (N,) highest voxel probability per slice

    @property
    def voxels(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def dense(self) -> np.ndarray:
        """The (N, rows, columns) bool stack (for tests and small series)."""
        out = np.zeros(self.shape, dtype=bool)
        for k, m in self.masks.items():
            out[k] = m
        return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _axis(s: int, side: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-res neighbours and weight of high-res pixels start..stop-1 (pixel centres aligned as
    torch's align_corners=False, what a model trained on area-mean downsampled masks expects)."""
    centres = (np.arange(start, stop, dtype=np.float64) + 0.5) * (s / side) - 0.5
    lo = np.clip(np.floor(centres).astype(np.int64), 0, s - 1)
    w = np.clip(centres - np.floor(centres), 0.0, 1.0).astype(np.float32)
    w[centres < 0] = 0.0
    return lo, np.clip(lo + 1, 0, s - 1), w


def upsample_bilinear(prob: np.ndarray, side: int, rows: tuple[int, int] | None = None,
                      cols: tuple[int, int] | None = None) -> np.ndarray:
    """(n, S, S) -> (n, side, side) bilinear, or only the window `rows` x `cols` of it."""
    n, s, _ = prob.shape
    r0, r1 = rows or (0, side)
    c0, c1 = cols or (0, side)
    rlo, rhi, rw = _axis(s, side, r0, r1)
    clo, chi, cw = _axis(s, side, c0, c1)
    out = prob[:, rlo, :] * (1 - rw)[None, :, None] + prob[:, rhi, :] * rw[None, :, None]
    return out[:, :, clo] * (1 - cw)[None, None, :] + out[:, :, chi] * cw[None, None, :]


def _window(hot: np.ndarray, scale: float, side: int) -> tuple[int, int]:
    """High-res range whose bilinear values can reach the threshold: every such pixel has a
    low-res neighbour in `hot` (indices at or above the threshold), so one pixel either side."""
    return max(0, int((hot.min() - 1) * scale)), min(side, int(np.ceil((hot.max() + 2) * scale)))


def body_box(batch: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the model grid to run on: the body's bounding box over the batch
    (air is 0 in every window whose lower bound lies above air), MARGIN pixels of air around it,
    whole multiples of STRIDE. The model is fully convolutional: outside, only air, no blood."""
    s = batch.shape[-1]
    body = batch.max(axis=(0, 1)) > 0
    spans = []
    for axis in (1, 0):
        hit = np.flatnonzero(body.any(axis=axis))
        if not len(hit):
            return slice(0, s), slice(0, s)
        lo, hi = max(0, int(hit[0]) - MARGIN), min(s, int(hit[-1]) + 1 + MARGIN)
        size = min(s, -(-(hi - lo) // STRIDE) * STRIDE)
        lo = min(lo, s - size)
        spans.append(slice(lo, lo + size))
    return spans[0], spans[1]


def _uncrop(square: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Undo ct_preprocess's squaring (air padded around a non-square slice)."""
    side = square.shape[-1]
    top, left = (side - rows) // 2, (side - columns) // 2
    return square[:, top:top + rows, left:left + columns]


def segment_stack(windowed: np.ndarray, context: int, infer: Infer, threshold: float,
                  matrix: tuple[int, int], batch_size: int = 32) -> SliceMasks:
    """Windowed (N, W, S, S) stack (float 0..1 or `window_u8`'s uint8) -> the thresholded mask
    on the source (rows, columns) matrix."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"voxel threshold {threshold} is not a probability between 0 and 1")
    n, s = len(windowed), windowed.shape[-1]
    rows, columns = matrix
    side = max(rows, columns)
    masks: dict[int, np.ndarray] = {}
    peak = np.zeros(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        batch = add_context(windowed, context, index)
        box_rows, box_cols = body_box(batch)
        batch = np.ascontiguousarray(batch[:, :, box_rows, box_cols])
        if batch.dtype == np.uint8:
            batch = batch.astype(np.float32) * np.float32(1.0 / LEVELS)
        logits = np.asarray(infer(batch), dtype=np.float32)
        if logits.shape[0] != len(index) or logits.shape[-2:] != batch.shape[-2:]:
            raise ValueError(f"the model returned {logits.shape} for a batch of {len(index)} "
                             f"slices of {batch.shape[-2:]}; a segmentation model returns "
                             "(n, 1, H, W) logits")
        prob = np.zeros((len(index), s, s), dtype=np.float32)  # probability 0 outside the body
        prob[:, box_rows, box_cols] = sigmoid(logits.reshape(len(index), *logits.shape[-2:]))
        peak[index] = prob.max(axis=(1, 2))
        for j in np.flatnonzero(peak[index] >= threshold):
            hot_rows, hot_cols = np.nonzero(prob[j] >= threshold)
            r0, r1 = _window(hot_rows, side / s, side)
            c0, c1 = _window(hot_cols, side / s, side)
            full = np.zeros((side, side), dtype=bool)
            full[r0:r1, c0:c1] = upsample_bilinear(prob[j:j + 1], side, (r0, r1), (c0, c1))[0] >= threshold
            full = _uncrop(full[None], rows, columns)[0]
            if full.any():
                masks[int(index[j])] = full
    return SliceMasks((n, rows, columns), masks, peak)


def volume_ml(voxels: int, pixel_spacing_mm: tuple[float, float], slice_spacing_mm: float) -> float:
    """Volume of `voxels` in millilitres (1 mL = 1000 mm^3)."""
    if voxels < 0 or slice_spacing_mm <= 0 or min(pixel_spacing_mm) <= 0:
        raise ValueError(f"cannot compute a volume from {voxels} voxels of {pixel_spacing_mm} mm "
                         f"x {slice_spacing_mm} mm")
    return voxels * pixel_spacing_mm[0] * pixel_spacing_mm[1] * slice_spacing_mm / MM3_PER_ML


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); 1.0 when both are empty."""
    a, b = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# --- masks as plain JSON (they cross the model-service boundary in AnalysisResult) -------------


def mask_to_runs(mask: np.ndarray) -> list[int]:
    """Row-major run-length code of a 2-D bool mask: [start, length, start, length, ...]."""
    flat = np.concatenate([[False], np.asarray(mask, bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).ravel().tolist()


def runs_to_mask(runs: list[int], rows: int, columns: int) -> np.ndarray:
    """Inverse of mask_to_runs; every run is checked against the matrix before it is written."""
    if rows <= 0 or columns <= 0 or rows * columns > MAX_MASK_PIXELS:
        raise ValueError(f"a {rows} x {columns} mask is not a CT slice")
    if len(runs) > 2 * rows * columns:  # more runs than pixels: not a mask of this matrix
        raise ValueError(f"{len(runs) // 2} mask runs cannot lie in a {rows} x {columns} matrix")
    values = np.asarray(runs, dtype=np.int64)
    if values.ndim != 1 or len(values) % 2:
        raise ValueError("mask runs must be [start, length, ...] pairs")
    starts, lengths = values[0::2], values[1::2]
    if len(values) and (starts.min() < 0 or lengths.min() < 1 or (starts + lengths).max() > rows * columns):
        raise ValueError(f"mask runs fall outside the {rows} x {columns} matrix")
    flat = np.zeros(rows * columns + 1, dtype=np.int8)
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return (np.cumsum(flat[:-1]) > 0).reshape(rows, columns)


MAX_MASK_PIXELS = 4096 * 4096


def runs_area(runs: list[int]) -> int:
    """Pixels a run-length coded mask covers (its runs do not overlap), without decoding it."""
    return int(sum(runs[1::2]))


def slice_runs(segmentation: dict[str, Any] | None, sop_instance_uid: str) -> list[int] | None:
    """One slice's runs in a result's `segmentation`; None when nothing on it is segmented."""
    for entry in (segmentation or {}).get("slices") or []:
        if entry.get("sop_instance_uid") == sop_instance_uid:
            return list(entry["runs"])
    return None


def slice_mask(segmentation: dict[str, Any] | None, sop_instance_uid: str) -> np.ndarray | None:
    """One slice's mask from a result's `segmentation` (only that slice is decoded: a key image
    needs a few slices, not the series); None when the slice has no segmented pixel."""
    runs = slice_runs(segmentation, sop_instance_uid)
    if runs is None:
        return None
    return runs_to_mask(runs, int(segmentation["rows"]), int(segmentation["columns"]))
