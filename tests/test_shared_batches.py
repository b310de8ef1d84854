"""Concurrent studies share model runs; every caller gets exactly its own rows back."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.shared_batches import SharedBatches
from tests.node_harness import poll


class GatedModel:
    """Row sums; the first call blocks until released, so that later batches queue up."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        if np.any(x < 0):
            raise ValueError("negative input")
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)


def _wait_queued(batches: SharedBatches, n: int) -> None:
    poll(lambda: batches._queue.qsize() >= n, 30, 0.005, f"{n} batches waiting")


def test_queued_batches_run_together_and_each_caller_gets_its_rows():
    model = GatedModel()
    batches = SharedBatches(model, max_items=1000, full_rows=1000)
    rng = np.random.default_rng(0)
    inputs = [rng.random((n, 3, 4), dtype=np.float32) for n in (5, 7, 1, 64, 3)]
    with ThreadPoolExecutor(len(inputs)) as pool:
        first = pool.submit(batches, inputs[0])
        assert model.entered.wait(30)
        rest = [pool.submit(batches, x) for x in inputs[1:]]
        _wait_queued(batches, len(rest))
        model.release.set()
        results = [first.result(30)] + [f.result(30) for f in rest]
    for x, out in zip(inputs, results, strict=True):
        assert out.shape == (len(x), 1)
        assert np.allclose(out[:, 0], x.reshape(len(x), -1).sum(axis=1), rtol=1e-5)
    assert model.calls == [5, 7 + 1 + 64 + 3], "the queued batches were not run as one"
    assert (batches.runs, batches.batches) == (2, 5)
    batches.close()


def test_only_batches_below_full_rows_are_topped_up():
    """Joining full batches costs a copy and buys nothing: they run as they are."""
    model = GatedModel()
    batches = SharedBatches(model, max_items=100, full_rows=4)
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(batches, np.ones((1, 3), np.float32))]
        assert model.entered.wait(30)
        for i, rows in enumerate((3, 4, 4, 1)):
            futures.append(pool.submit(batches, np.ones((rows, 3), np.float32)))
            _wait_queued(batches, i + 1)
        model.release.set()
        assert [f.result(30).shape[0] for f in futures] == [1, 3, 4, 4, 1]
    assert model.calls == [1, 3 + 4, 4, 1]
    batches.close()


def test_a_full_batch_is_not_overfilled_and_other_shapes_wait_for_their_own_run():
    model = GatedModel()
    batches = SharedBatches(model, max_items=10)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batches, np.ones((2, 3), np.float32))
        assert model.entered.wait(30)
        a = pool.submit(batches, np.ones((6, 3), np.float32))
        _wait_queued(batches, 1)
        b = pool.submit(batches, np.ones((6, 3), np.float32))  # 12 rows > 10: a run of its own
        _wait_queued(batches, 2)
        c = pool.submit(batches, np.ones((1, 5), np.float32))  # another shape
        _wait_queued(batches, 3)
        model.release.set()
        assert [f.result(30).shape for f in (first, a, b, c)] == [(2, 1), (6, 1), (6, 1), (1, 1)]
    assert model.calls == [2, 6, 6, 1]
    batches.close()


def test_an_error_reaches_every_caller_of_that_run_and_the_thread_keeps_serving():
    model = GatedModel()
    batches = SharedBatches(model)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batches, np.ones((1, 2), np.float32))
        assert model.entered.wait(30)
        bad = pool.submit(batches, -np.ones((1, 2), np.float32))
        good_in_same_run = pool.submit(batches, np.ones((2, 2), np.float32))
        _wait_queued(batches, 2)
        model.release.set()
        assert first.result(30)[0, 0] == 2
        for f in (bad, good_in_same_run):
            with pytest.raises(ValueError, match="negative input"):
                f.result(30)
    assert batches(np.full((1, 2), 3, np.float32))[0, 0] == 6
    batches.close()
