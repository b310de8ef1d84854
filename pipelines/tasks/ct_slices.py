"""Task `ct-slices`: a CT series scored slice by slice (2.5D), one finding for the study.

The analysis is pipelines/ct_triage.py (series loading in ct_series.py, windowing in
ct_preprocess.py); this module is what the node needs besides: the card's `preprocessing`
block (windows, context slices, size; the input tensor must fit them), and the key images,
the highest-scoring slices in the card's first window with the slice position named.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipelines.findings import AnalysisResult
from pipelines.model_card import CardError, CardFields, CtPreprocessing, ModelCard, TensorSpec
from pipelines.tasks import register
from pipelines.tasks.base import Infer, VerdictTask

DEFAULT_WINDOW = (40.0, 80.0)  # brain window, for a result whose model is no longer installed


def window_of(card: ModelCard | None) -> tuple[float, float]:
    """The window key images are shown in: the card's first."""
    if card is not None and isinstance(card.preprocessing, CtPreprocessing):
        return tuple(card.preprocessing.windows[0])
    return DEFAULT_WINDOW


class CtSlices(VerdictTask):
    name = "ct-slices"
    tensor_endpoint = "infer_ct"

    def parse_preprocessing(self, block: CardFields, tensor: TensorSpec,
                            input_where: str) -> CtPreprocessing:
        p = block
        windows = tuple((float(c), float(w)) for c, w in p.req("windows", list))
        if not windows or any(w <= 0 for _, w in windows):
            raise CardError(f"{p.where}.windows: give [centre, width] pairs with width > 0")
        pre = CtPreprocessing(
            windows=windows,
            context_slices=p.req("context_slices", int),
            size=p.req("size", int),
            min_slices=p.opt("min_slices", 16, int),
            max_slice_gap_mm=p.opt("max_slice_gap_mm", 10.0, float),
        )
        expected_channels = len(windows) * (2 * pre.context_slices + 1)
        if tensor.shape[1:] != (expected_channels, pre.size, pre.size):
            raise CardError(
                f"{input_where}.shape: {list(tensor.shape)} does not fit preprocessing "
                f"({len(windows)} windows x {2 * pre.context_slices + 1} slices, size {pre.size}): "
                f"expected [-1, {expected_channels}, {pre.size}, {pre.size}]"
            )
        return pre

    def analyse(self, card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                executor: Executor | None = None) -> AnalysisResult:
        from pipelines.ct_triage import analyse_ct_series

        return analyse_ct_series(card, paths, infer, executor=executor)

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        from pipelines.key_images import slice_label, window_label

        labels = []
        for key in result.get("key_images") or []:
            uid = key["sop_instance_uid"]
            where = slice_label(order.index(uid) + 1, len(order), None) if uid in order else "slice"
            labels.append(f"{where}, {window_label(window_of(card))}, score {key['score']:.2f}")
        return labels

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        from pipelines.key_images import render_ct_key_image

        found = key_slice(result, index, instances)
        if found is None:
            return None
        key, ds, hu, where = found
        return render_ct_key_image(hu, window_of(card), where, score=key.get("score"))


def key_slice(result: dict[str, Any], index: int, instances: list[dict[str, Any]]
              ) -> tuple[dict[str, Any], pydicom.Dataset, np.ndarray, str] | None:
    """Key image `index` of the result: its entry, its dataset, its HU pixels and its position
    ("slice 12 of 24, z = 30.0 mm"); None when the result has no such key image or its file
    is no longer spooled."""
    from pipelines.key_images import slice_label

    keys = result.get("key_images") or []
    if index >= len(keys):
        return None
    key = keys[index]
    order = [r["sop_instance_uid"] for r in instances]
    if key["sop_instance_uid"] not in order:
        return None
    row = instances[order.index(key["sop_instance_uid"])]
    ds = pydicom.dcmread(row["path"])
    hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) \
        + float(getattr(ds, "RescaleIntercept", 0))
    position = getattr(ds, "ImagePositionPatient", None)
    z = float(position[2]) if position is not None and len(position) == 3 else None
    return key, ds, hu, slice_label(order.index(key["sop_instance_uid"]) + 1, len(order), z)

TASK = register(CtSlices())
