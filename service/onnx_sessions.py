"""onnxruntime sessions built the way DESIGN.md measured them to run best.

CPU: intra-op threads = (cores - reserved) // workers, one inter-op thread, sequential
execution, all graph optimisations, no spinning on a shared CPU. GPU: the CUDA execution
provider when configured and available, with CPU as the fallback for unsupported nodes.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from pipelines.model_card import ModelCard

log = logging.getLogger("befund.onnx")


def default_threads(reserved: int = 1, workers: int = 1) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cores or 1) - reserved) // max(1, workers))


def build_session(card: ModelCard, provider: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            log.warning("CUDA requested for %s but onnxruntime has no CUDA provider here; using CPU",
                        card.key)
    session = ort.InferenceSession(str(card.model_path), sess_options=opts, providers=providers)
    log.info("model %s loaded on %s", card.key, session.get_providers()[0])
    return session


class Predictor:
    """Calls one ONNX session with the card's input/output names: (n, ...) float32 -> (n, k)."""

    def __init__(self, card: ModelCard, session: ort.InferenceSession):
        self.card = card
        self.session = session
        self.input_name = card.input.name
        self.output_name = card.output.name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]
