"""The model service: loads the ONNX models named by the cards and analyses series by path.

The gateway sends paths, not pixels (DESIGN.md: a `depends` call costs ~90 ms at 16 MB).
Here the series is read, decoded in worker processes, preprocessed and inferred in batches.
`infer_ct` / `infer_wsi` are batchable tensor endpoints for ML engineers and benchmarks;
`infer_shared` takes the same tensors through shared memory when the caller is on this host
(service/shared_tensors.py: the HTTP body costs more than the model at these sizes); the same
call is also served at `POST /shm/infer`, a plain Starlette route without BentoML's API layer,
for callers that make one call per batch (service/shared_client.py says why).
Every call of a model, from any endpoint, goes through that model's one inference thread,
so concurrent studies share model runs instead of competing for the cores
(service/shared_batches.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard, usable_cards
from pipelines.tasks import task_of
from service.config import load_config
from service.logging_setup import configure_logging
from service.onnx_sessions import Predictor, build_session, default_threads
from service.parent_death import die_with_parent, exit_with
from service.private_files import keep_files_private
from service.shared_batches import SharedBatches
from service.shared_tensors import SharedTensor, SharedTensorReader

log = logging.getLogger("befund.models")
# BentoML's batcher answers 503 to a request it expects to wait longer than this. On CPU one
# batch takes 20 ms to seconds, so a low bound would refuse the second caller in flight.
MAX_LATENCY_MS = 30_000


def _noop() -> int:
    return os.getpid()


def _default_for(cards: list[ModelCard], endpoint: str) -> str | None:
    """The model a tensor endpoint runs: the last loaded card whose task names that endpoint."""
    keys = [c.key for c in cards if task_of(c).tensor_endpoint == endpoint]
    return keys[-1] if keys else None


async def _infer_shared_route(request: Request) -> JSONResponse:
    """POST /shm/infer {"tensors": [SharedTensor, ...]} -> {"outputs": [[[...]], ...]}."""
    try:
        tensors = [SharedTensor.model_validate(t) for t in json.loads(await request.body())["tensors"]]
    except (ValueError, KeyError, TypeError, ValidationError) as e:
        return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
    try:
        outputs = await bentoml.get_current_service().run_shared(tensors)
    except bentoml.exceptions.BentoMLException as e:
        return JSONResponse({"error": str(e)}, status_code=int(e.error_code))
    return JSONResponse({"outputs": [o.tolist() for o in outputs]})


shared_route = Starlette(routes=[Route("/infer", _infer_shared_route, methods=["POST"])])


@bentoml.asgi_app(shared_route, path="/shm")
@bentoml.service(name="befund_models", workers=1, threads=4, traffic={"timeout": 1800})
class ModelService:
    def __init__(self) -> None:
        die_with_parent()
        keep_files_private()
        configure_logging()  # a model host (role models) has no gateway that would do it
        config = load_config()
        self.spool = Path(config.spool_path).resolve()
        # test hook (refused unless BEFUND_TESTING=1), on a model host (role models) only: each
        # analysis waits this long first, so a test can kill a replica in the middle of a call
        # (tests/test_model_replicas.py)
        delays = dict(config.fault_delays) if config.role == "models" else {}
        self.analysis_delay_s = delays.get("analysis", 0.0)
        cards, errors = usable_cards(config.models_dir)
        for folder, error in errors.items():
            log.error("model %s not loaded: %s", folder, error)
        self.cards = {c.key: c for c in cards}
        threads = config.inference_threads or default_threads(reserved=0)
        # every call of a model goes through its one inference thread (service/shared_batches.py)
        self.predictors = {
            key: SharedBatches(Predictor(card, build_session(card, config.inference_provider, threads)),
                               max_items=256, name=key)
            for key, card in self.cards.items()}
        cores = default_threads(reserved=0)
        # decode workers end with this process (service/parent_death.py says why a watchdog)
        self.executor = ProcessPoolExecutor(max_workers=cores,
                                            mp_context=multiprocessing.get_context("spawn"),
                                            initializer=exit_with, initargs=(os.getpid(),))
        for f in [self.executor.submit(_noop) for _ in range(cores)]:
            f.result()  # start the decoders now, not on the first study
        self.shared = SharedTensorReader()
        self.default_ct = _default_for(list(self.cards.values()), "infer_ct")
        self.default_wsi = _default_for(list(self.cards.values()), "infer_wsi")
        log.info("model service ready: %s", ", ".join(self.cards))

    @bentoml.on_shutdown
    def stop_decoders(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.shared.close()
        for batches in self.predictors.values():
            batches.close()

    def _check_paths(self, paths: list[str]) -> list[str]:
        for p in paths:
            if not Path(p).resolve().is_relative_to(self.spool):
                raise ValueError(f"path outside the spool refused: {p}")
        return paths

    @bentoml.api
    def analyse(self, model: str, paths: list[str]) -> dict[str, Any]:
        """Analyse one series (CT stack or slide instances) with the model `name@version`."""
        card = self.cards.get(model)
        if card is None:
            return AnalysisResult.not_analysed(f"model {model} is not loaded").to_dict()
        paths = self._check_paths(paths)
        if self.analysis_delay_s:
            log.info("analysis of %d instance(s) with %s waits %.1f s (fault_delays)", len(paths), model,
                     self.analysis_delay_s)
            time.sleep(self.analysis_delay_s)  # the test hook above
        result = task_of(card).analyse(card, paths, self.predictors[model], executor=self.executor)
        return result.to_dict()

    @bentoml.api
    def models(self) -> list[dict[str, Any]]:
        return [{"key": c.key, "name": c.name, "version": c.version, "task": c.task,
                 "intended_use": c.intended_use, "validation": c.validation}
                for c in self.cards.values()]

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=256, max_latency_ms=MAX_LATENCY_MS)
    def infer_ct(self, tensor: np.ndarray) -> np.ndarray:
        """Raw model outputs of the default CT model for a (n, C, S, S) float32 batch."""
        if self.default_ct is None:
            raise bentoml.exceptions.NotFound("no model for infer_ct is loaded (a ct-slices model)")
        return self.predictors[self.default_ct](tensor)

    @bentoml.api
    async def infer_shared(self, tensors: list[SharedTensor]) -> list[np.ndarray]:
        """Raw outputs for tensors in shared memory: one array per tensor, in order.

        The model runs on the shared memory itself, without a copy. Not a BentoML batchable
        API: its batcher would join concurrent calls with a copy and hold the next call back
        until the current batch is done; here each tensor goes straight to its model's
        inference thread, which tops up small batches with whatever else waits
        (service/shared_batches.py). The await needs no worker thread.
        """
        return await self.run_shared(tensors)

    async def run_shared(self, tensors: list[SharedTensor]) -> list[np.ndarray]:
        """What `infer_shared` and `POST /shm/infer` do: map, hand to the model thread, await."""
        try:
            arrays = [self.shared.array(t) for t in tensors]
        except (ValueError, OSError) as e:
            raise bentoml.exceptions.InvalidArgument(str(e)) from e
        futures = [self.predictors[self._model_for(t)].submit(a)
                   for t, a in zip(tensors, arrays, strict=True)]
        return [await asyncio.wrap_future(f) for f in futures]

    def _model_for(self, tensor: SharedTensor) -> str:
        """The named model, or the one whose card input shape fits the tensor."""
        if tensor.model:
            if tensor.model not in self.predictors:
                raise bentoml.exceptions.NotFound(f"model {tensor.model} is not loaded")
            return tensor.model
        shape = tensor.shape
        fits = [key for key, card in self.cards.items()
                if len(card.input.shape) == len(shape)
                and all(want in (-1, got) for want, got in zip(card.input.shape[1:], shape[1:], strict=True))]
        if not fits:
            raise bentoml.exceptions.NotFound(f"no loaded model takes tensors of shape {shape}")
        return fits[-1]

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=512, max_latency_ms=MAX_LATENCY_MS)
    def infer_wsi(self, tensor: np.ndarray) -> np.ndarray:
        """Raw model outputs of the default slide model for a (n, 3, T, T) float32 batch."""
        if self.default_wsi is None:
            raise bentoml.exceptions.NotFound("no model for infer_wsi is loaded (a wsi-tiles model)")
        return self.predictors[self.default_wsi](tensor)
