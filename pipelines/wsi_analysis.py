"""Whole-slide analysis: a slide's instances -> tumor-probability heatmap -> slide verdict.

1. Level: the pyramid level nearest the card's spacing that is not coarser than it by more
   than 10 %; tiles are read there (never the base level resized). A tile of `tile_size` model
   pixels covers round(tile_size * model spacing / level spacing) level pixels (resized only
   when a slide lacks a level at the model's spacing).
2. Tissue: WSInfer-style detection (pipelines.tissue) on the overview level, the one nearest
   8-16 um/px with at least 256 px on its short side (`Slide.overview_level`); a tile is kept
   when its centre lies in tissue.
3. Decode: kept tiles are grouped into chunks of 8 x 8 tiles; each chunk decodes only the
   frames its kept tiles touch (in worker processes when an executor is given). Chunks are
   submitted a few at a time and inferred as they complete, so decoding overlaps inference
   and memory stays bounded whatever the slide size.
4. Infer: tiles are normalised per the card and run in batches of card batch_size.
5. Verdict: the card's aggregation (`top3_mean` for the reference model: the mean of the three
   most suspicious tiles) over the tissue tiles' probabilities, compared with the card's
   threshold; its certainty is the card's calibration of that score. Tumor area = tiles with
   probability >= 0.5 times the tile area.

The card's validated domain is checked on the way: the read level's pixel spacing and a
stated stain before any tile is decoded, the OOD score on the colour of the tiles the model
saw before a verdict is given (pipelines.domain). Outside it: "not analysed", with the reason.

`infer` takes an (n, 3, T, T) float32 batch and returns (n, n_classes) raw outputs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.domain import FEATURES, OutsideDomain, check_ood, shown, slide_vector
from pipelines.findings import AnalysisResult, KeyImage, NotAnalysable
from pipelines.model_card import ModelCard, ValidatedDomain, WsiPreprocessing
from pipelines.scoring import aggregate, positive_probability
from pipelines.tissue import TissueMask, detect_tissue
from pipelines.wsi_slide import FILL, Level, Slide, decode_bytes, open_slide, read_overview

Infer = Callable[[np.ndarray], np.ndarray]
CHUNK_TILES = 8  # chunk side in tiles (8 x 224 = 1792 = 7 x 256: frame-aligned for 224 tiles)
SPACING_TOLERANCE = 1.1  # a level may be at most 10 % coarser than the model's spacing
TUMOR_TILE_PROBABILITY = 0.5  # a tile counts towards tumor area from this probability


def choose_level(slide: Slide, spacing_um: float, domain: ValidatedDomain | None = None,
                 model: str = "the model") -> Level:
    """The coarsest level not coarser than the model's spacing (+10 %); else not analysable.
    With the card's `domain`, the chosen level's spacing must lie in its validated range."""
    fine_enough = [lv for lv in slide.levels if lv.spacing_um <= spacing_um * SPACING_TOLERANCE]
    subject = f"slide {slide.series_instance_uid}"
    valid = domain.pixel_spacing_um if domain is not None else None
    if not fine_enough:
        finest = slide.levels[0].spacing_um
        if valid is not None:
            raise OutsideDomain(subject, model, "pixel spacing", f"{finest:.3g} um/px (its finest level)",
                                f"{valid} um/px: tiles are read at {spacing_um:.3g} um/px; rescan at "
                                "higher magnification")
        raise NotAnalysable(f"slide {slide.series_instance_uid} is scanned at {finest:.3g} um/px; the model "
                            f"needs {spacing_um:.3g} um/px or finer (rescan at higher magnification)")
    level = max(fine_enough, key=lambda lv: lv.spacing_um)
    if valid is not None and not valid.holds(level.spacing_um):
        raise OutsideDomain(subject, model, "pixel spacing", f"{level.spacing_um:.3g} um/px (the level "
                            f"nearest {spacing_um:.3g} um/px)", f"{valid} um/px")
    return level


def check_stains(slide: Slide, domain: ValidatedDomain | None, model: str) -> None:
    """A slide that names a staining substance the model was not validated on is refused; one
    that names none is taken as H&E (wsi_slide.SLIDE_DEFAULTS)."""
    if domain is None or not domain.stains or not slide.stains_stated:
        return
    other = [s for s in slide.stains if s not in domain.stains]
    if other:
        raise OutsideDomain(f"slide {slide.series_instance_uid}", model, "stain",
                            ", ".join(shown(s, 40) for s in other), " + ".join(domain.stains))


@dataclass(frozen=True)
class ChunkJob:
    """What a worker needs to decode one chunk: only the frames its tiles touch."""

    path: str
    transfer_syntax: str
    tile_rows: int
    tile_cols: int
    level_rows: int
    level_cols: int
    frames: dict[tuple[int, int], tuple[int, int]]  # (ty, tx) -> (file offset, length)
    tiles: tuple[tuple[int, int], ...]  # (grid row, grid col) of each kept tile
    read_px: int  # tile side in level pixels
    out_px: int  # tile side the model takes
    photometric: str = ""  # the level's PhotometricInterpretation (JPEG streams that do not say)


def decode_chunk(job: ChunkJob) -> tuple[tuple[tuple[int, int], ...], np.ndarray, float]:
    """Decode a chunk's tiles -> (tiles, uint8 array (n, out, out, 3), seconds). Runs in workers."""
    t0 = time.perf_counter()
    cache: dict[tuple[int, int], np.ndarray] = {}
    out = np.empty((len(job.tiles), job.out_px, job.out_px, 3), np.uint8)
    tr, tc, n = job.tile_rows, job.tile_cols, job.read_px
    with open(job.path, "rb") as fp:
        for k, (r, c) in enumerate(job.tiles):
            y, x = r * n, c * n
            tile = np.full((n, n, 3), FILL, np.uint8)
            for ty in range(y // tr, min(y + n, job.level_rows) // tr + 1):
                for tx in range(x // tc, min(x + n, job.level_cols) // tc + 1):
                    where = job.frames.get((ty, tx))
                    if where is None:
                        continue
                    if (ty, tx) not in cache:
                        fp.seek(where[0])
                        cache[(ty, tx)] = decode_bytes(job.transfer_syntax, fp.read(where[1]), tr, tc,
                                                       job.photometric)
                    frame = cache[(ty, tx)]
                    y0, x0 = ty * tr, tx * tc
                    sy0, sx0 = max(y, y0), max(x, x0)
                    sy1, sx1 = min(y + n, y0 + tr, job.level_rows), min(x + n, x0 + tc, job.level_cols)
                    if sy1 > sy0 and sx1 > sx0:
                        tile[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = frame[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
            if n != job.out_px:
                tile = np.asarray(Image.fromarray(tile).resize((job.out_px, job.out_px), Image.BILINEAR))
            out[k] = tile
    return job.tiles, out, time.perf_counter() - t0


def chunk_jobs(level: Level, keep: np.ndarray, read_px: int, out_px: int) -> list[ChunkJob]:
    """One job per 8 x 8 block of the tile grid that holds kept tiles."""
    jobs = []
    rows, cols = keep.shape
    tr, tc = level.tile_rows, level.tile_cols
    for r0 in range(0, rows, CHUNK_TILES):
        for c0 in range(0, cols, CHUNK_TILES):
            sub = np.argwhere(keep[r0:r0 + CHUNK_TILES, c0:c0 + CHUNK_TILES])
            if not len(sub):
                continue
            tiles = tuple((int(r0 + r), int(c0 + c)) for r, c in sub)
            frames: dict[tuple[int, int], tuple[int, int]] = {}
            for r, c in tiles:
                y, x = r * read_px, c * read_px
                for ty in range(y // tr, min(y + read_px, level.rows) // tr + 1):
                    for tx in range(x // tc, min(x + read_px, level.cols) // tc + 1):
                        idx = level.frame_at(ty, tx)
                        if idx is not None:
                            frames[(ty, tx)] = (int(level.frame_offsets[idx]), int(level.frame_lengths[idx]))
            jobs.append(ChunkJob(str(level.path), level.transfer_syntax, tr, tc, level.rows, level.cols,
                                 frames, tiles, read_px, out_px, level.photometric))
    return jobs


def normalise(tiles: np.ndarray, pre: WsiPreprocessing) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W), (x / 255 - mean) / std per channel."""
    mean = (np.asarray(pre.mean, np.float32) * 255.0)[:, None, None]
    inv_std = (1.0 / (np.asarray(pre.std, np.float32) * 255.0))[:, None, None]
    x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32)  # one copy: layout + type
    x -= mean
    x *= inv_std
    return x


class _Batcher:
    """Collects decoded tiles and runs the model whenever a full batch is ready."""

    def __init__(self, infer: Infer, card: ModelCard, probs: np.ndarray):
        self.infer, self.card, self.probs = infer, card, probs
        self.pre: WsiPreprocessing = card.preprocessing  # type: ignore[assignment]
        self.tiles: list[np.ndarray] = []
        self.where: list[tuple[int, int]] = []
        self.infer_s = self.normalise_s = 0.0
        self.count = 0
        domain = card.validated_domain
        self.ood = domain.ood if domain is not None else None
        self.feature_rows: list[np.ndarray] = []  # the OOD score's per-tile features

    def add(self, where: Sequence[tuple[int, int]], tiles: np.ndarray) -> None:
        self.tiles.extend(tiles)
        self.where.extend(where)
        while len(self.tiles) >= self.pre.batch_size:
            self._run(self.pre.batch_size)

    def flush(self) -> None:
        while self.tiles:
            self._run(min(len(self.tiles), self.pre.batch_size))

    def _run(self, n: int) -> None:
        t0 = time.perf_counter()
        batch = np.stack(self.tiles[:n])
        if self.ood is not None:
            self.feature_rows.append(FEATURES[self.ood.features].compute(batch))
        x = normalise(batch, self.pre)
        t1 = time.perf_counter()
        p = positive_probability(np.asarray(self.infer(x)), self.card)
        t2 = time.perf_counter()
        rows, cols = zip(*self.where[:n], strict=True)
        self.probs[list(rows), list(cols)] = p
        del self.tiles[:n], self.where[:n]
        self.normalise_s += t1 - t0
        self.infer_s += t2 - t1
        self.count += n


def _run_chunks(jobs: list[ChunkJob], batcher: _Batcher, executor: Executor | None) -> tuple[float, float]:
    """Decode chunks (in the executor, a few in flight) and feed them to the batcher as they finish.

    Returns (decode seconds summed over chunks, seconds the caller waited for decoding).
    """
    decode_s = wait_s = 0.0
    if executor is None:
        for job in jobs:
            tiles, arr, secs = decode_chunk(job)
            decode_s += secs
            wait_s += secs
            batcher.add(tiles, arr)
        return decode_s, wait_s
    in_flight = max(2, 2 * int(getattr(executor, "_max_workers", 2)))
    pending: deque[Future] = deque()
    queue = iter(jobs)
    for job in queue:
        pending.append(executor.submit(decode_chunk, job))
        if len(pending) >= in_flight:
            break
    while pending:
        t0 = time.perf_counter()
        tiles, arr, secs = pending.popleft().result()
        wait_s += time.perf_counter() - t0
        decode_s += secs
        nxt = next(queue, None)
        if nxt is not None:
            pending.append(executor.submit(decode_chunk, nxt))
        batcher.add(tiles, arr)
    return decode_s, wait_s


def tissue_of(slide: Slide, pre: WsiPreprocessing) -> TissueMask:
    """Tissue on the slide's overview level (near 8-16 um/px, never under 256 px a side)."""
    rgb, spacing_um = read_overview(slide)
    return detect_tissue(rgb, spacing_um, pre.tissue_saturation)


def analyse_wsi_slide(card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                      executor: Executor | None = None) -> AnalysisResult:
    """Slide instances -> heatmap, verdict, key tiles; every failure becomes 'not analysed'."""
    pre = card.preprocessing
    if not isinstance(pre, WsiPreprocessing):
        raise ValueError(f"model {card.key} is a {card.task} model, not a slide tile model")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    domain = card.validated_domain
    model = f"the {card.name} model"
    try:
        slide = open_slide(paths)
        level = choose_level(slide, pre.spacing_um, domain, model)
        check_stains(slide, domain, model)
    except NotAnalysable as exc:
        return AnalysisResult.not_analysed(str(exc), open=time.perf_counter() - t0)
    t1 = time.perf_counter()
    timings["open"] = t1 - t0

    read_px = int(round(pre.tile_size * pre.spacing_um / level.spacing_um))
    tile_um = read_px * level.spacing_um
    rows, cols = -(-level.rows // read_px), -(-level.cols // read_px)
    tissue = tissue_of(slide, pre)
    keep = tissue.tile_grid(rows, cols, tile_um)
    t2 = time.perf_counter()
    timings["tissue"] = t2 - t1
    tissue_fraction = float(keep.mean()) if keep.size else 0.0
    if not keep.any() or tissue_fraction < pre.tissue_min_fraction:
        return AnalysisResult.not_analysed(
            f"slide {slide.series_instance_uid}: no tissue found ({tissue_fraction:.2%} of "
            f"{rows * cols} tiles at {level.spacing_um:.3g} um/px; detection by {tissue.method}); "
            "check the scan or the slide",
            **timings)

    probs = np.full((rows, cols), np.nan, np.float32)
    batcher = _Batcher(infer, card, probs)
    jobs = chunk_jobs(level, keep, read_px, pre.tile_size)
    t3 = time.perf_counter()
    decode_s, wait_s = _run_chunks(jobs, batcher, executor)
    batcher.flush()
    t4 = time.perf_counter()
    timings["decode"] = decode_s
    timings["decode_wait"] = wait_s
    timings["normalise"] = batcher.normalise_s
    timings["infer"] = batcher.infer_s
    timings["tiles_stage"] = t4 - t3

    ood_distance = None
    if batcher.ood is not None:
        vector = slide_vector(batcher.feature_rows)
        try:
            if vector is None:
                raise OutsideDomain(f"slide {slide.series_instance_uid}", model, "stained tissue",
                                    "none in the tissue tiles", "H&E-stained tissue")
            ood_distance = check_ood(batcher.ood, vector, f"slide {slide.series_instance_uid}", model)
        except NotAnalysable as exc:
            return AnalysisResult.not_analysed(str(exc), **timings)
    tile_probs = probs[keep]
    score = aggregate(tile_probs, card.postprocessing.aggregation)
    tumor_tiles = int((tile_probs >= TUMOR_TILE_PROBABILITY).sum())
    tile_mm2 = (tile_um / 1000.0) ** 2
    kept = np.argwhere(keep)
    top = kept[np.argsort(-tile_probs, kind="stable")[: card.postprocessing.key_images]]
    key_images = []
    for r, c in top:
        ty = min(int((r + 0.5) * read_px), level.rows - 1) // level.tile_rows
        tx = min(int((c + 0.5) * read_px), level.cols - 1) // level.tile_cols
        frame = level.frame_at(ty, tx)
        key_images.append(KeyImage(level.sop_class_uid, level.sop_instance_uid, float(probs[r, c]),
                                   None if frame is None else frame + 1))
    values = np.where(keep, np.round(np.nan_to_num(probs, nan=-1.0), 4), -1.0)
    heatmap = {
        "rows": rows,
        "cols": cols,
        "tile_size_px": read_px,
        "spacing_um": level.spacing_um,
        "level_sop_instance_uid": level.sop_instance_uid,
        "values": [float(v) for v in values.ravel()],
    }
    t5 = time.perf_counter()
    timings["postprocess"] = t5 - t4
    timings["total"] = t5 - t0
    measurements = {
        "tiles_analysed": float(batcher.count),
        "tissue_fraction": round(tissue_fraction, 6),
        "tumor_area_mm2": round(tumor_tiles * tile_mm2, 4),
        "tumor_tile_fraction": round(tumor_tiles / max(batcher.count, 1), 6),
        "tissue_area_mm2": round(batcher.count * tile_mm2, 4),
        "level_spacing_um": level.spacing_um,
        "tiles_per_second": round(batcher.count / max(t4 - t3, 1e-9), 2),
    }
    if ood_distance is not None:
        measurements["ood_distance"] = round(ood_distance, 3)
    threshold = card.postprocessing.threshold
    probability = card.calibration.probability(score, threshold) if card.calibration else None
    return AnalysisResult.verdict(
        score, threshold, probability, key_images=tuple(key_images),
        scores=tuple(round(float(p), 4) for p in tile_probs), measurements=measurements,
        timings={k: round(v, 4) for k, v in timings.items()}, heatmap=heatmap)
