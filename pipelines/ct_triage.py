"""CT triage: a series' files -> slice probabilities -> a study verdict with key images.

`infer` is whatever runs the model (an onnxruntime session in the model service, a stub in
tests): it takes an (n, C, S, S) float32 batch and returns (n, n_classes) raw outputs. The
card says how to turn them into probabilities and how to aggregate slices into a study score,
how certain that score's verdict is (its calibration), and what the model was validated on:
header checks run before decoding, the OOD score on the windowed stack before inference
(pipelines.domain); outside the domain the result is "not analysed" with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from pathlib import Path

import numpy as np

from pipelines.ct_preprocess import add_context, window_resize
from pipelines.ct_series import deshear, load_ct_series
from pipelines.domain import FEATURES, check_ood
from pipelines.findings import AnalysisResult, KeyImage, NotAnalysable
from pipelines.model_card import CtPreprocessing, ModelCard
from pipelines.scoring import aggregate, positive_probability

Infer = Callable[[np.ndarray], np.ndarray]


def infer_in_batches(windowed: np.ndarray, context: int, infer: Infer, batch_size: int) -> np.ndarray:
    """Build each batch's 2.5D tensor only when it is needed and run the model on it."""
    n = len(windowed)
    outputs = [np.asarray(infer(add_context(windowed, context, np.arange(i, min(i + batch_size, n)))))
               for i in range(0, n, batch_size)]
    return np.concatenate(outputs)


def analyse_ct_series(card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                      executor: Executor | None = None, batch_size: int = 64) -> AnalysisResult:
    """Load -> preprocess -> infer -> aggregate; every failure becomes a 'not analysed' result."""
    pre = card.preprocessing
    if not isinstance(pre, CtPreprocessing):
        raise ValueError(f"model {card.key} is a {card.task} model, not a CT slice model")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # with worker processes, windowing and resizing run where each chunk was decoded (in
    # parallel, and a quarter-size array crosses back); "preprocess" then times only what is left
    in_workers = partial(window_resize, windows=pre.windows, size=pre.size) if executor else None
    domain = card.validated_domain
    model = f"the {card.name} model"
    try:
        series = load_ct_series(paths, pre, executor, transform=in_workers, model=model, domain=domain)
    except NotAnalysable as exc:
        return AnalysisResult.not_analysed(str(exc), load=time.perf_counter() - t0)
    t1 = time.perf_counter()
    timings["load"] = t1 - t0
    windowed = series.hu if in_workers else window_resize(series.hu, pre.windows, pre.size)
    if series.inplane_offsets_mm is not None:  # a tilted gantry: line the slices up first
        scale = max(series.headers[0].rows, series.headers[0].columns) / pre.size
        windowed = deshear(windowed, series.inplane_offsets_mm,
                           (series.pixel_spacing[0] * scale, series.pixel_spacing[1] * scale))
    ood_distance = None
    if domain is not None and domain.ood is not None:
        features = FEATURES[domain.ood.features].compute(windowed, pre.windows)
        try:
            ood_distance = check_ood(domain.ood, features, f"series {series.series_uid}", model)
        except NotAnalysable as exc:
            return AnalysisResult.not_analysed(str(exc), load=timings["load"],
                                               preprocess=time.perf_counter() - t1)
    t2 = time.perf_counter()
    timings["preprocess"] = t2 - t1
    raw = infer_in_batches(windowed, pre.context_slices, infer, batch_size)
    t3 = time.perf_counter()
    # building the 2.5D batches is preprocessing work done inside the inference loop; it is cheap
    timings["infer"] = t3 - t2
    if len(raw) != len(series.headers):
        raise ValueError(f"model {card.key} returned {len(raw)} outputs for {len(series.headers)} slices")
    prob = positive_probability(raw, card)
    score = aggregate(prob, card.postprocessing.aggregation)
    top = np.argsort(-prob, kind="stable")[: max(card.postprocessing.key_images, 0)]
    key_images = tuple(
        KeyImage(series.headers[i].sop_class_uid, series.headers[i].sop_instance_uid, float(prob[i]))
        for i in top)
    threshold = card.postprocessing.threshold
    measurements = {
        "slices": float(len(prob)),
        "slices_above_threshold": float(np.count_nonzero(prob >= threshold)),
        "max_slice_score": float(prob.max()),
        "slice_gap_mm": series.slice_gap_mm,
        "pixel_spacing_mm": float(series.pixel_spacing[0]),
        # the geometry the slices were analysed in: tilt from the headers, shear corrected
        "gantry_tilt_deg": round(series.tilt_deg, 2),
    }
    if ood_distance is not None:
        measurements["ood_distance"] = round(ood_distance, 3)
    timings["postprocess"] = time.perf_counter() - t3
    probability = card.calibration.probability(score, threshold) if card.calibration else None
    return AnalysisResult.verdict(score, threshold, probability, key_images=key_images,
                                  scores=tuple(float(p) for p in prob), timings=timings,
                                  measurements=measurements)
