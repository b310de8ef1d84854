"""A BentoML entry service used only by benchmarks/model_service.py.

It reaches the model service through `bentoml.depends`, exactly as the gateway does (same
proxy, same serialisation), and times those calls from inside; the benchmark compares them
with raw onnxruntime on the same batches.
"""

from __future__ import annotations

import time

import bentoml
import numpy as np

from pipelines.ct_preprocess import preprocess_ct
from pipelines.ct_series import load_ct_series
from service.config import load_config
from service.model_service import ModelService


@bentoml.service(name="befund_bench", workers=1, traffic={"timeout": 1800})
class Bench:
    models = bentoml.depends(ModelService)

    @bentoml.api
    async def time_infer(self, model_key: str, paths: list[str], batch: int, repeat: int) -> dict:
        from pipelines.model_card import usable_cards

        cards, _ = usable_cards(load_config().models_dir)
        card = next(c for c in cards if c.key == model_key)
        tensor = preprocess_ct(load_ct_series(paths, card.preprocessing).hu, card.preprocessing)
        batches = [tensor[i:i + batch] for i in range(0, len(tensor), batch)]
        client = self.models.to_async
        outputs = [await client.infer_ct(tensor=b) for b in batches]  # warm-up and check
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for b in batches:
                await client.infer_ct(tensor=b)
            best = min(best, time.perf_counter() - t)
        return {"seconds": best, "slices": len(tensor),
                "outputs": np.concatenate(outputs).ravel().tolist()}

    @bentoml.api
    async def time_infer_shared(self, model_key: str, paths: list[str], batch: int, repeat: int) -> dict:
        """The same batches through shared memory: copied in per call, and built in place."""
        from contextlib import ExitStack

        from pipelines.model_card import usable_cards
        from service.shared_tensors import shared_tensor

        cards, _ = usable_cards(load_config().models_dir)
        card = next(c for c in cards if c.key == model_key)
        tensor = preprocess_ct(load_ct_series(paths, card.preprocessing).hu, card.preprocessing)
        batches = [tensor[i:i + batch] for i in range(0, len(tensor), batch)]
        client = self.models.to_async

        async def copied_in() -> list[np.ndarray]:
            outs = []
            for b in batches:
                with shared_tensor(b.shape, model=model_key) as (arr, ref):
                    arr[...] = b
                    outs.append((await client.infer_shared(tensors=[ref]))[0])
            return outs

        with ExitStack() as stack:
            placed = []
            for b in batches:
                arr, ref = stack.enter_context(shared_tensor(b.shape, model=model_key))
                arr[...] = b
                placed.append(ref)

            async def in_place() -> list[np.ndarray]:
                return [(await client.infer_shared(tensors=[r]))[0] for r in placed]

            result = {"slices": len(tensor)}
            for name, run in (("copied_in", copied_in), ("in_place", in_place)):
                outputs = await run()  # warm-up and check
                best = float("inf")
                for _ in range(repeat):
                    t = time.perf_counter()
                    await run()
                    best = min(best, time.perf_counter() - t)
                result[name] = {"seconds": best,
                                "outputs": np.concatenate(outputs).ravel().tolist()}
        return result

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
