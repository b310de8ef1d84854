"""What a task is: the `Task` protocol, and `VerdictTask`, the common parts of tasks whose
result is one finding, present or absent, with a score against the card's threshold.

A task is the code behind a card's `task:` string. It owns everything that differs between
kinds of model, so the node's service code calls the same methods for every model:

- parse and check the card's `preprocessing` and `postprocessing` blocks (errors name the
  field, through `CardFields`);
- say whether a series fits (`mismatch`, '' when it does);
- analyse a series' files with an injected `infer` (the model service passes its batched
  onnxruntime session; tests pass a stub) into an `AnalysisResult`;
- build its result objects from the result and the source headers: the SR, and a SEG when
  the result has one (`has_seg`, `build_seg`);
- render its key images and say what the worklist shows of the result.

Everything here is pure (pipelines/): datasets, arrays and files in, datasets and PNG bytes
out; no network, no state DB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pydicom

from pipelines.findings import AnalysisResult
from pipelines.model_card import CardFields, ModelCard, Postprocessing, TensorSpec, parse_postprocessing
from pipelines.result_uids import ResultUids

Infer = Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class Task(Protocol):
    """One kind of model. `name` is the card's `task:` string; `tensor_endpoint` names the
    model service's batchable tensor endpoint (`infer_ct`, `infer_wsi`) that runs this task's
    last loaded model on raw tensors, '' for none."""

    name: str
    tensor_endpoint: str

    def parse_preprocessing(self, block: CardFields, tensor: TensorSpec, input_where: str) -> Any:
        """The card's `preprocessing` block as a typed object; `tensor` is the card's input
        (to check that they fit), `input_where` names it in an error."""

    def parse_postprocessing(self, block: CardFields) -> Postprocessing:
        """The card's `postprocessing` block (a Postprocessing, or a subclass of it)."""

    def mismatch(self, card: ModelCard, series: dict[str, Any]) -> str:
        """Why the series (service/routing.py `series_facts`) does not fit; '' when it does."""

    def analyse(self, card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                executor: Executor | None = None) -> AnalysisResult:
        """The series' files -> a verdict, or "not analysed" with a reason."""

    def referenced_instances(self, result: AnalysisResult) -> list[str]:
        """SOP instance UIDs whose headers `build_sr` and `build_seg` need (key images first)."""

    def build_sr(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                 uids: ResultUids, run: int, supersedes: ResultUids | None) -> pydicom.Dataset:
        """The TID 1500 SR of the result (also of a "not analysed" one)."""

    def has_seg(self, card: ModelCard, result: AnalysisResult) -> bool:
        """Whether the result comes with a Segmentation."""

    def build_seg(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                  uids: ResultUids, run: int) -> pydicom.Dataset:
        """The result's Segmentation (only asked when `has_seg`)."""

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        """One caption per key image the worklist shows; `order` is the series' instance UIDs
        in their stored order. `card` is None when the model is no longer installed."""

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        """Key image `index` as PNG from the spooled `instances` (rows with sop_instance_uid
        and path), or None when there is no such image."""

    def worklist_summary(self, card: ModelCard, result: AnalysisResult) -> dict[str, Any]:
        """What the job's stored result adds for the worklist and API (finding, priority...)."""


class VerdictTask:
    """Shared parts of a one-finding task; a task subclasses it and gives `name`,
    `parse_preprocessing`, `analyse` and its key images."""

    name = ""
    tensor_endpoint = ""

    def parse_postprocessing(self, block: CardFields) -> Postprocessing:
        return parse_postprocessing(block)

    def mismatch(self, card: ModelCard, series: dict[str, Any]) -> str:
        return card.selector.mismatch(series)

    def referenced_instances(self, result: AnalysisResult) -> list[str]:
        return [k.sop_instance_uid for k in result.key_images]

    def output_shape(self, card: ModelCard) -> tuple[int, ...]:
        """What the model returns for a batch (-1: the batch axis): one score per class."""
        return (-1, len(card.output.classes))

    def build_sr(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                 uids: ResultUids, run: int, supersedes: ResultUids | None) -> pydicom.Dataset:
        from pipelines.sr_encoding import build_result_sr

        return build_result_sr(card, result, headers, uids, run, supersedes=supersedes)

    def has_seg(self, card: ModelCard, result: AnalysisResult) -> bool:
        return False

    def build_seg(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                  uids: ResultUids, run: int) -> pydicom.Dataset:
        raise ValueError(f"a {self.name} result has no segmentation")

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        return []

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        return None

    def worklist_summary(self, card: ModelCard, result: AnalysisResult) -> dict[str, Any]:
        return {
            "task": card.task,
            "finding": {"value": card.finding.code.value, "scheme": card.finding.code.scheme,
                        "meaning": card.finding.code.meaning},
            "priority": card.postprocessing.priority_when_positive if result.present else "normal",
        }
