"""CT stack -> model tensor: HU windows, resize to the card's size, 2.5D slice context.

The whole stack is processed at once (in blocks of slices to bound memory), never slice by
slice. Channel order of the output is window-major: channel = window * (2k + 1) + j, where
j = 0 .. 2k is the neighbour offset -k .. +k (edge slices repeat themselves).

Windowing is clip(HU, centre - width/2, centre + width/2) mapped linearly to 0..1. Clipping
comes before the area-mean resize (so a bright skull next to brain is averaged as the window
shows it), and because the 0..1 mapping is linear it is applied after the mean, on the small
array. For an integer downscale factor (512 -> 128) the mean is a reshape-sum on integers.
"""

from __future__ import annotations

import numpy as np

from pipelines.model_card import CtPreprocessing

AIR_HU = -1024
BLOCK_SLICES = 32


def context_indices(n: int, k: int) -> np.ndarray:
    """(n, 2k+1) slice indices of each slice's neighbours -k..+k, edge-replicated."""
    return np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)


def _square(hu: np.ndarray) -> np.ndarray:
    n, h, w = hu.shape
    if h == w:
        return hu
    side = max(h, w)
    out = np.full((n, side, side), AIR_HU, dtype=hu.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top:top + h, left:left + w] = hu
    return out


def _bounds(windows: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    return [(c - w / 2.0, c + w / 2.0) for c, w in windows]


def _pool_sum(x: np.ndarray, f: int, acc: type) -> np.ndarray:
    """Sum over f x f pixel blocks of (m, side, side) -> (m, side/f, side/f).

    Adding strided views is about 7x faster than numpy's reduce over a short trailing axis.
    """
    cols = x[:, :, 0::f].astype(acc)
    for j in range(1, f):
        cols += x[:, :, j::f]
    rows = cols[:, 0::f, :].copy()
    for j in range(1, f):
        rows += cols[:, j::f, :]
    return rows


def window_resize(hu: np.ndarray, windows: tuple[tuple[float, float], ...], size: int) -> np.ndarray:
    """(N, H, W) HU -> (N, n_windows, size, size) float32 in 0..1."""
    if hu.ndim != 3:
        raise ValueError(f"expected an (N, H, W) stack, got shape {hu.shape}")
    hu = _square(hu)
    n, side, _ = hu.shape
    bounds = _bounds(windows)
    out = np.empty((n, len(bounds), size, size), dtype=np.float32)
    factor = side // size if side % size == 0 else 0
    integral = np.issubdtype(hu.dtype, np.integer) and all(
        float(lo).is_integer() and float(hi).is_integer() for lo, hi in bounds)
    for start in range(0, n, BLOCK_SLICES):
        block = hu[start:start + BLOCK_SLICES]
        m = len(block)
        if factor:
            if not integral:
                block = block.astype(np.float32)
            acc = np.int32 if integral else np.float32
            for w, (lo, hi) in enumerate(bounds):
                if integral:
                    clipped = np.clip(block, block.dtype.type(lo), block.dtype.type(hi))
                else:
                    clipped = np.clip(block, np.float32(lo), np.float32(hi))
                mean = _pool_sum(clipped, factor, acc).astype(np.float32) * np.float32(1.0 / factor**2)
                out[start:start + m, w] = (mean - np.float32(lo)) * np.float32(1.0 / (hi - lo))
        else:
            from skimage.transform import resize

            block = block.astype(np.float32)
            for w, (lo, hi) in enumerate(bounds):
                scaled = (np.clip(block, lo, hi) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
                out[start:start + m, w] = resize(scaled, (m, size, size), order=1, anti_aliasing=True,
                                                 preserve_range=True).astype(np.float32)
    return out


def add_context(windowed: np.ndarray, k: int, index: np.ndarray | None = None) -> np.ndarray:
    """(N, W, S, S) -> (len(index), W*(2k+1), S, S): each slice with its k neighbours either side.

    `index` selects which slices to build (default all), so a caller can build batches lazily.
    """
    n, n_windows, s, _ = windowed.shape
    idx = context_indices(n, k)
    if index is not None:
        idx = idx[index]
    stacked = windowed[idx]  # (m, 2k+1, W, S, S)
    channels = n_windows * (2 * k + 1)
    return np.ascontiguousarray(stacked.transpose(0, 2, 1, 3, 4).reshape(len(idx), channels, s, s))


def preprocess_ct(hu: np.ndarray, pre: CtPreprocessing) -> np.ndarray:
    """(N, H, W) HU, sorted along the stack -> (N, C, S, S) float32 model input."""
    return add_context(window_resize(hu, pre.windows, pre.size), pre.context_slices)
