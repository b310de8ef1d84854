"""A task defined only in the test tree, registered through the config key `task_modules`.

`toy-mean-hu`: each instance of a series becomes one number, its mean Hounsfield value divided
by the card's `preprocessing.scale`; the model (a one-weight ONNX graph the test writes) turns
that number into a logit; the study score is the card's aggregation of the instances'
probabilities. Its key image is the highest-scoring instance, drawn by this module. It shows
what a new kind of model needs: one module implementing pipelines.tasks.base.Task, no change
to service/.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from pipelines.findings import AnalysisResult, KeyImage
from pipelines.model_card import CardError, CardFields, ModelCard, TensorSpec
from pipelines.scoring import aggregate, positive_probability
from pipelines.tasks import register
from pipelines.tasks.base import Infer, VerdictTask

NAME = "toy-mean-hu"
MAX_INSTANCES = 64  # a peer decides how many instances a series has: bounded before reading


@dataclass(frozen=True)
class ToyPreprocessing:
    scale: float  # HU per model input unit


def mean_hu(path: str | Path) -> float:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    return float(pixels.mean() * float(getattr(ds, "RescaleSlope", 1))
                 + float(getattr(ds, "RescaleIntercept", 0)))


class ToyMeanHu(VerdictTask):
    name = NAME

    def parse_preprocessing(self, block: CardFields, tensor: TensorSpec,
                            input_where: str) -> ToyPreprocessing:
        scale = block.req("scale", float)
        if not scale > 0:
            raise CardError(f"{block.where}.scale: {scale} must be greater than 0")
        if tensor.shape != (-1, 1):
            raise CardError(f"{input_where}.shape: {list(tensor.shape)} does not fit {NAME}: "
                            "expected [-1, 1] (one mean per instance)")
        return ToyPreprocessing(scale)

    def mismatch(self, card: ModelCard, series: dict[str, Any]) -> str:
        why = card.selector.mismatch(series)
        if not why and int(series.get("instance_count") or 0) > MAX_INSTANCES:
            return f"{series['instance_count']} instances, {NAME} takes at most {MAX_INSTANCES}"
        return why

    def analyse(self, card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                executor: Executor | None = None) -> AnalysisResult:
        if len(paths) > MAX_INSTANCES:
            return AnalysisResult.not_analysed(
                f"{len(paths)} instances; the {card.name} model takes at most {MAX_INSTANCES}")
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        means = np.array([mean_hu(p) for p in paths], dtype=np.float32)
        x = (means / card.preprocessing.scale).astype(np.float32)[:, None]
        prob = positive_probability(np.asarray(infer(x)), card)
        score = aggregate(prob, card.postprocessing.aggregation)
        top = np.argsort(-prob, kind="stable")[: card.postprocessing.key_images]
        keys = tuple(KeyImage(str(headers[i].SOPClassUID), str(headers[i].SOPInstanceUID), float(prob[i]))
                     for i in top)
        return AnalysisResult.verdict(score, card.postprocessing.threshold, key_images=keys,
                                      scores=tuple(float(p) for p in prob),
                                      measurements={"instances": float(len(paths)),
                                                    "mean_hu_max": float(means.max())})

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        where = {uid: f"toy instance {i + 1} of {len(order)}" for i, uid in enumerate(order)}
        return [f"{where.get(k['sop_instance_uid'], 'toy instance')}, score {k['score']:.2f}"
                for k in result.get("key_images") or []]

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        keys = result.get("key_images") or []
        by_uid = {r["sop_instance_uid"]: r["path"] for r in instances}
        if index >= len(keys) or keys[index]["sop_instance_uid"] not in by_uid:
            return None
        pixels = pydicom.dcmread(by_uid[keys[index]["sop_instance_uid"]]).pixel_array.astype(np.float64)
        span = max(float(pixels.max() - pixels.min()), 1.0)
        grey = ((pixels - pixels.min()) / span * 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(grey).save(out, format="PNG")
        return out.getvalue()

    def worklist_summary(self, card: ModelCard, result: AnalysisResult) -> dict[str, Any]:
        summary = super().worklist_summary(card, result)
        summary["priority"] = "high" if result.present else "low"
        return summary


TASK = register(ToyMeanHu())
