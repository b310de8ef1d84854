"""Timing loops for `befund model bench`: N callers in flight for a fixed time, each call's
latency kept, and the sgemm rate that says what the machine's cores can do at best.

Both sides of the comparison (raw onnxruntime, the model service) go through the same loop
shape: every caller repeats its call until the deadline, so throughput is items / wall time
and the percentiles are over every call made.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    batch: int
    concurrency: int
    calls: int
    seconds: float
    items_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timing(batch: int, concurrency: int, latencies: list[float], wall: float) -> Timing:
    lat = np.array(latencies) * 1000.0
    p50, p95, p99 = (round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99))
    return Timing(batch, concurrency, len(latencies), round(wall, 3),
                  round(len(latencies) * batch / wall, 2), p50, p95, p99)


def measure_threads(call: Callable[[np.ndarray], Any], batch: np.ndarray, concurrency: int,
                    seconds: float) -> Timing:
    """`concurrency` threads calling `call(batch)` until `seconds` have passed."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    ends = [0.0] * concurrency

    def caller(i: int, deadline_box: list[float]) -> None:
        start.wait()
        while True:
            t = time.perf_counter()
            call(batch)
            done = time.perf_counter()
            latencies[i].append(done - t)
            if done >= deadline_box[0]:
                ends[i] = done
                return

    box = [0.0]
    threads = [threading.Thread(target=caller, args=(i, box), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    began = time.perf_counter()
    box[0] = began + seconds
    start.wait()
    for th in threads:
        th.join()
    return _timing(len(batch), concurrency, [x for lat in latencies for x in lat], max(ends) - began)


async def measure_async(calls: list[Callable[[], Awaitable[Any]]], batch: int, seconds: float) -> Timing:
    """One asyncio task per entry of `calls` (each caller its own input), until `seconds`."""
    latencies: list[float] = []
    began = time.perf_counter()
    deadline = began + seconds

    async def caller(call: Callable[[], Awaitable[Any]]) -> float:
        while True:
            t = time.perf_counter()
            await call()
            done = time.perf_counter()
            latencies.append(done - t)
            if done >= deadline:
                return done

    ends = await asyncio.gather(*(caller(c) for c in calls))
    return _timing(batch, len(calls), latencies, max(ends) - began)


def sgemm_gflops(n: int = 2048, repeat: int = 5) -> dict[str, Any]:
    """Best float32 matrix-multiply rate of numpy's BLAS on this machine (2 n^3 flops each)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # noqa: B018 - warm-up: threads and pages
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b  # noqa: B018 - timed
        best = min(best, time.perf_counter() - t)
    return {"n": n, "best_s": round(best, 5), "gflops": round(2.0 * n ** 3 / best / 1e9, 2),
            "blas": _blas_name()}


def _blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")
        return str(config["Build Dependencies"]["blas"].get("name", "?"))
    except Exception:  # noqa: BLE001 - numpy's config layout differs between versions
        return "?"
