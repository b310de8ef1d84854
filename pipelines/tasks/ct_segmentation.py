"""Task `ct-segmentation`: a CT series segmented slice by slice (2.5D), the finding's volume.

The model gives one logit per pixel of each slice (input as `ct-slices`: HU windows x
neighbour slices, `preprocessing` parsed the same way). The analysis loads and checks the
stack (ct_series.py, the card's validated domain included), windows it in the decode workers
to uint8 (ct_volume.window_u8), refuses a stack whose image statistics are unlike the
validation data (the card's `validated_domain.ood`, as ct-slices does), runs the model in
batches, thresholds the probabilities on the source matrix and measures the volume
(ct_volume.py). The finding is present when the
segmented volume reaches the card's `postprocessing.min_volume_ml`.

Certainty: with a card `calibration`, the probability of the stated verdict, calibrated from
the segmented volume (`presence_score`); without one, none is stated.

Results: a BINARY DICOM SEG of the segmented slices (ct_seg_encoding.py) and the TID 1500 SR
whose finding group is a TID 1411 Volumetric ROI group: Volume in mL (UCUM "ml") measured on
the SEG's segment, which it references, and the presence. With nothing segmented there is no
SEG and the SR's TID 1501 group states the volume (0 mL) and "absent".

Key images: the slices with the largest segmented area, drawn as ct-slices draws them with
the model's mask outlined (only the key slice's runs decoded from the stored result) and a
caption with the series' volume and the slice's segmented area.

Postprocessing block:

    threshold: 0.5        # voxel probability
    min_volume_ml: 0.5    # present from this segmented volume on
    priority_when_positive: high
    key_images: 3         # the slices with the largest segmented area
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import SegmentationStorage

from pipelines.ct_series import deshear, load_ct_series, reshear_masks
from pipelines.ct_volume import (
    mask_to_runs,
    runs_area,
    segment_stack,
    slice_mask,
    slice_runs,
    u8_slice_mean_features,
    volume_ml,
    window_u8,
)
from pipelines.domain import FEATURES, check_ood
from pipelines.findings import AnalysisResult, KeyImage, NotAnalysable
from pipelines.model_card import CardError, CardFields, ModelCard, Postprocessing
from pipelines.result_uids import ResultUids
from pipelines.tasks import register
from pipelines.tasks.base import Infer
from pipelines.tasks.ct_slices import CtSlices, key_slice, window_of

AGGREGATION = "segmented-volume"  # what the SR's algorithm parameters name as the aggregation
BATCH_SLICES = 32


@dataclass(frozen=True)
class SegmentationPostprocessing(Postprocessing):
    min_volume_ml: float = 0.5


class CtSegmentation(CtSlices):
    name = "ct-segmentation"
    tensor_endpoint = ""  # infer_ct serves slice classifiers; a mask model has no raw endpoint

    def parse_postprocessing(self, block: CardFields) -> SegmentationPostprocessing:
        q = block
        threshold = q.req("threshold", float)
        if not 0.0 < threshold < 1.0:
            raise CardError(f"{q.where}.threshold: {threshold} must lie between 0 and 1 "
                            "(a voxel probability)")
        min_volume = q.opt("min_volume_ml", 0.5, float)
        if not 0.0 <= min_volume < 1e4:
            raise CardError(f"{q.where}.min_volume_ml: {min_volume} must lie between 0 and 10000 mL")
        return SegmentationPostprocessing(
            aggregation=AGGREGATION, threshold=threshold,
            priority_when_positive=q.opt("priority_when_positive", "high"),
            key_images=q.opt("key_images", 3, int), min_volume_ml=min_volume)

    def analyse(self, card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                executor: Executor | None = None) -> AnalysisResult:
        return analyse_ct_segmentation(card, paths, infer, executor)

    def output_shape(self, card: ModelCard) -> tuple[int, ...]:
        """One logit per pixel of the input grid."""
        return (-1, 1, card.preprocessing.size, card.preprocessing.size)

    def referenced_instances(self, result: AnalysisResult) -> list[str]:
        from pipelines.ct_seg_encoding import segmented_slices

        return [k.sop_instance_uid for k in result.key_images] + segmented_slices(result)

    def has_seg(self, card: ModelCard, result: AnalysisResult) -> bool:
        return bool(result.analysed and result.present and (result.segmentation or {}).get("slices"))

    def build_sr(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                 uids: ResultUids, run: int, supersedes: ResultUids | None) -> pydicom.Dataset:
        from pipelines.sr_encoding import build_result_sr

        segment = None
        if self.has_seg(card, result):
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=SegmentationStorage, sop_instance_uid=uids.seg_sop_uid, segment_number=1,
                source_series=hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID)))
        return build_result_sr(card, result, headers, uids, run, supersedes=supersedes, segment=segment)

    def build_seg(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                  uids: ResultUids, run: int) -> pydicom.Dataset:
        from pipelines.ct_seg_encoding import build_mask_seg

        return build_mask_seg(card, result, headers, uids.seg_series_uid, uids.seg_sop_uid, run)

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        """The slice labels plus the area segmented on each slice (square pixels of the
        measured row spacing: the labels read no file)."""
        labels = super().key_image_labels(card, result, order)
        spacing = (result.get("measurements") or {}).get("pixel_spacing_mm")
        for i, key in enumerate((result.get("key_images") or [])[:len(labels)]):
            runs = slice_runs(result.get("segmentation"), key["sop_instance_uid"])
            if runs and spacing:
                labels[i] += f", {runs_area(runs) * spacing * spacing / 100.0:.1f} cm\u00b2 segmented"
        return labels

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        """The slice as ct-slices draws it, the model's mask outlined (only this slice's mask
        decoded), and a caption with the slice's segmented area and the series' volume."""
        from pipelines.key_images import render_ct_key_image

        found = key_slice(result, index, instances)
        if found is None:
            return None
        key, ds, hu, where = found
        model = (card.name if card is not None else "") or "the model"
        mask = slice_mask(result.get("segmentation"), key["sop_instance_uid"])
        if mask is None:
            mask, drawn = np.zeros(hu.shape, dtype=bool), f"outline: {model} mask (none on this slice)"
        elif mask.shape != hu.shape:  # the spooled file is not the matrix the mask was made on
            mask, drawn = np.zeros(hu.shape, dtype=bool), f"{model} mask not drawn: not this slice's matrix"
        else:
            drawn = f"outline: {model} mask"
        return render_ct_key_image(hu, window_of(card), where, score=key.get("score"), mask=mask,
                                   notes=segmentation_notes(result, mask, ds), outline_label=drawn)

    def worklist_summary(self, card: ModelCard, result: AnalysisResult) -> dict[str, Any]:
        summary = super().worklist_summary(card, result)
        if "volume_ml" in result.measurements:
            summary["volume_ml"] = result.measurements["volume_ml"]
        return summary


PRESENCE_THRESHOLD = 0.5  # presence_score at the card's min_volume_ml


def presence_score(volume: float, min_volume_ml: float) -> float:
    """The segmented volume as a score in [0, 1) that reaches PRESENCE_THRESHOLD exactly at
    `min_volume_ml`: V / (V + V0), whose logit is log(V / V0). The card's `calibration`
    (temperature scaling around PRESENCE_THRESHOLD, models/ich_seg/fit_domain.py) turns it into
    the certainty of the verdict without changing the verdict."""
    volume = max(float(volume), 0.0)
    return volume / (volume + float(min_volume_ml))


def analyse_ct_segmentation(card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                            executor: Executor | None = None) -> AnalysisResult:
    """Load -> window (uint8) -> segment -> volume; every failure becomes 'not analysed'."""
    pre, post = card.preprocessing, card.postprocessing
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    to_u8 = partial(window_u8, windows=pre.windows, size=pre.size)
    try:
        series = load_ct_series(paths, pre, executor, transform=to_u8, model=f"the {card.name} model",
                                domain=card.validated_domain)
    except NotAnalysable as exc:
        return AnalysisResult.not_analysed(str(exc), load=time.perf_counter() - t0)
    t1 = time.perf_counter()
    timings["load"] = t1 - t0
    windowed = series.hu
    first = series.headers[0]
    if series.inplane_offsets_mm is not None:  # a tilted gantry: line the slices up first
        scale = max(first.rows, first.columns) / pre.size
        windowed = deshear(windowed, series.inplane_offsets_mm,
                           (series.pixel_spacing[0] * scale, series.pixel_spacing[1] * scale))
    domain, ood_distance = card.validated_domain, None
    if domain is not None and domain.ood is not None:  # image statistics as on the validation data
        features = u8_slice_mean_features(FEATURES[domain.ood.features].compute, windowed, pre.windows)
        try:
            ood_distance = check_ood(domain.ood, features, f"series {series.series_uid}",
                                     f"the {card.name} model")
        except NotAnalysable as exc:
            return AnalysisResult.not_analysed(str(exc), load=timings["load"],
                                               preprocess=time.perf_counter() - t1)
    seg = segment_stack(windowed, pre.context_slices, infer, post.threshold, (first.rows, first.columns),
                        batch_size=BATCH_SLICES)
    t2 = time.perf_counter()
    timings["infer"] = t2 - t1
    gap = series.slice_gap_mm
    if gap <= 0:
        return AnalysisResult.not_analysed(
            f"series {series.series_uid} not analysed: one slice has no thickness to measure a volume in",
            **timings)
    volume = volume_ml(seg.voxels, series.pixel_spacing, gap)  # measured where the slices line up
    if series.inplane_offsets_mm is not None:  # masks back onto the slices as stored: SEG, outline
        seg = dataclasses.replace(seg, masks=reshear_masks(seg.masks, series.inplane_offsets_mm,
                                                           series.pixel_spacing))
    present = volume >= post.min_volume_ml
    certainty = None
    if card.calibration is not None:  # the calibrated probability of the stated verdict
        p = card.calibration.probability(presence_score(volume, post.min_volume_ml), PRESENCE_THRESHOLD)
        certainty = p if present else 1.0 - p
    area = {k: int(m.sum()) for k, m in seg.masks.items()}
    ranked = sorted(area, key=lambda k: (-area[k], k)) if present else \
        list(np.argsort(-seg.max_probability, kind="stable"))
    key_images = tuple(KeyImage(series.headers[k].sop_class_uid, series.headers[k].sop_instance_uid,
                                float(seg.max_probability[k]))
                       for k in ranked[:max(post.key_images, 0)])
    segmentation = {
        "rows": first.rows, "columns": first.columns,
        "slices": [{"sop_instance_uid": series.headers[k].sop_instance_uid,
                    "runs": mask_to_runs(seg.masks[k])} for k in sorted(seg.masks)],
    } if present else None
    measurements = {
        "volume_ml": round(volume, 3),
        "slices": float(len(series.headers)),
        "slices_segmented": float(len(seg.masks)),
        "max_voxel_probability": float(seg.max_probability.max()),
        "slice_gap_mm": gap,
        "pixel_spacing_mm": float(series.pixel_spacing[0]),
        "gantry_tilt_deg": round(series.tilt_deg, 2),
    }
    if ood_distance is not None:
        measurements["ood_distance"] = round(ood_distance, 3)
    timings["postprocess"] = time.perf_counter() - t2
    return AnalysisResult(analysed=True, present=present, score=float(seg.max_probability.max()),
                          threshold=post.threshold, certainty=certainty, key_images=key_images,
                          scores=tuple(float(p) for p in seg.max_probability),
                          measurements=measurements, timings=timings, segmentation=segmentation)


def segmentation_notes(result: dict[str, Any], mask: np.ndarray, ds: pydicom.Dataset) -> list[str]:
    """Caption lines: "Intracranial hemorrhage 12.3 mL in the series" and the slice's
    segmented area in cm^2 (the slice's own pixel spacing)."""
    meaning = str(((result.get("finding") or {}).get("meaning")) or "segmented volume")
    volume = (result.get("measurements") or {}).get("volume_ml")
    lines = []
    if isinstance(volume, (int, float)):
        lines.append(f"{meaning} {volume:.1f} mL in the series"
                     + ("" if result.get("present") else " (below the model's minimum: absent)"))
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        area = int(mask.sum()) * float(spacing[0]) * float(spacing[1]) / 100.0
        lines.append(f"{area:.1f} cm2 segmented on this slice")  # the bitmap font has no \u00b2
    return lines


TASK = register(CtSegmentation())
