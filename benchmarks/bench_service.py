"""A BentoML entry service used only by benchmarks/model_service.py.

It reaches the model service through `bentoml.depends`, exactly as the gateway does (same
proxy, same serialisation), and times those calls from inside, alternating with raw
onnxruntime on the same batches in this same process, so that both see the same machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import bentoml
import numpy as np

from pipelines.ct_preprocess import preprocess_ct
from pipelines.ct_series import load_ct_series
from pipelines.model_card import ModelCard, usable_cards
from service.config import load_config
from service.model_service import ModelService
from service.onnx_sessions import Predictor, build_session, default_threads
from service.shared_client import SharedInferClient
from service.shared_tensors import SharedBuffer, SharedTensor


def _card(model_key: str) -> ModelCard:
    cards, _ = usable_cards(load_config().models_dir)
    return next(c for c in cards if c.key == model_key)


async def _two_in_flight(call: Callable[[SharedTensor], Awaitable[list[np.ndarray]]],
                         refs: list[SharedTensor]) -> list[np.ndarray]:
    """Each tensor's output, with two calls in flight, as two studies (or one caller that
    sends ahead) make them: one call's round trip overlaps the other's model run."""
    slots = asyncio.Semaphore(2)

    async def one(ref: SharedTensor) -> np.ndarray:
        async with slots:
            return (await call(ref))[0]

    return list(await asyncio.gather(*(one(r) for r in refs)))


@bentoml.service(name="befund_bench", workers=1, traffic={"timeout": 1800})
class Bench:
    models = bentoml.depends(ModelService)

    @bentoml.api
    async def compare_infer(self, model_key: str, paths: list[str], batch: int, repeat: int,
                            provider: str = "cpu") -> dict:
        """Seconds for all batches of one study, per way of calling the model, `repeat` rounds.

        raw: onnxruntime in this process. shared_direct: the batches already lie in shared
        memory (a caller that builds them there), one call at a time to `POST /shm/infer`
        with befund's lean client. shared_in_place: the same through the BentoML API
        `infer_shared` and the `depends` proxy. shared_two_in_flight:
        the same with two calls in flight. shared_copied_in: each batch is copied into
        the caller's one reusable staging region first. pickled: the batch in the HTTP body.
        """
        card = _card(model_key)
        tensor = preprocess_ct(load_ct_series(paths, card.preprocessing).hu, card.preprocessing)
        batches = [tensor[i:i + batch] for i in range(0, len(tensor), batch)]
        raw = Predictor(card, build_session(card, provider, default_threads(reserved=0)))
        client = self.models.to_async
        staging = SharedBuffer(batches[0].nbytes)
        placed = [SharedBuffer(b.nbytes) for b in batches]
        refs = []
        for buf, b in zip(placed, batches, strict=True):
            arr, ref = buf.tensor(b.shape, model=model_key)
            arr[...] = b
            refs.append(ref)

        async def run_raw() -> list[np.ndarray]:
            return [raw(b) for b in batches]

        async def shared_in_place() -> list[np.ndarray]:
            return [(await client.infer_shared(tensors=[r]))[0] for r in refs]

        direct = SharedInferClient.for_dependency()

        async def shared_direct() -> list[np.ndarray]:
            return [(await direct.infer([r]))[0] for r in refs]

        async def shared_direct_two_in_flight() -> list[np.ndarray]:
            return await _two_in_flight(lambda r: direct.infer([r]), refs)

        async def shared_two_in_flight() -> list[np.ndarray]:
            return await _two_in_flight(lambda r: client.infer_shared(tensors=[r]), refs)

        async def shared_copied_in() -> list[np.ndarray]:
            outs = []
            for b in batches:
                arr, ref = staging.tensor(b.shape, model=model_key)
                arr[...] = b
                outs.append((await client.infer_shared(tensors=[ref]))[0])
            return outs

        async def pickled() -> list[np.ndarray]:
            return [await client.infer_ct(tensor=b) for b in batches]

        modes: dict[str, Callable[[], Awaitable[list[np.ndarray]]]] = {
            "raw": run_raw, "shared_direct": shared_direct,
            "shared_direct_two_in_flight": shared_direct_two_in_flight, "shared_in_place": shared_in_place,
            "shared_two_in_flight": shared_two_in_flight, "shared_copied_in": shared_copied_in,
            "pickled": pickled}
        try:
            outputs = {name: np.concatenate(await run()).ravel() for name, run in modes.items()}
            rounds: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(repeat):  # alternate, so that every mode sees the same noise
                for name, run in modes.items():
                    t = time.perf_counter()
                    await run()
                    rounds[name].append(time.perf_counter() - t)
        finally:
            await direct.close()
            for buf in [staging, *placed]:
                buf.close()
        return {"slices": len(tensor), "seconds_per_round": rounds,
                "max_abs_diff_to_raw": {name: float(np.abs(out - outputs["raw"]).max())
                                        for name, out in outputs.items()}}

    @bentoml.api
    async def time_analyse(self, model_key: str, paths: list[str], repeat: int) -> dict:
        client = self.models.to_async
        best = float("inf")
        result = None
        for _ in range(repeat):
            t = time.perf_counter()
            result = await client.analyse(model=model_key, paths=paths)
            best = min(best, time.perf_counter() - t)
        return {"seconds": best, "present": result["present"]}

    @bentoml.api
    async def call_overhead(self, model_key: str, repeat: int, provider: str = "cpu") -> dict:
        """Median milliseconds of one call for a 1-row tensor, service minus raw: the fixed
        cost of a call, which the model time of a batch has to dwarf."""
        card = _card(model_key)
        shape = (1, *[d if d > 0 else 1 for d in card.input.shape[1:]])
        raw = Predictor(card, build_session(card, provider, default_threads(reserved=0)))
        buf = SharedBuffer(int(np.prod(shape)) * 4)
        try:
            arr, ref = buf.tensor(shape, model=model_key)
            arr[...] = 0.5
            client = self.models.to_async
            direct = SharedInferClient.for_dependency()
            times: dict[str, list[float]] = {"raw": [], "service": [], "direct": [], "models_list": []}
            for _ in range(repeat):
                t = time.perf_counter()
                raw(arr)
                times["raw"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await client.infer_shared(tensors=[ref])
                times["service"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await direct.infer([ref])
                times["direct"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await client.models()
                times["models_list"].append(time.perf_counter() - t)
            await direct.close()
        finally:
            buf.close()
        return {name: round(float(np.median(v)) * 1000, 3) for name, v in times.items()}
