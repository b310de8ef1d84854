"""Tensors through shared memory: the handle protocol, the model service's infer_shared and
its lean route `POST /shm/infer` with befund's client.

The service test serves `befund_models` alone with `bentoml serve` and calls it over HTTP with
JSON, as an ML engineer's client on the same host would; outputs must equal raw onnxruntime.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from pipelines.model_card import load_card
from service.onnx_sessions import Predictor, build_session
from service.shared_client import SharedInferClient, SharedInferError
from service.shared_tensors import SHM_DIR, SharedBuffer, SharedTensor, SharedTensorReader, shared_tensor
from tests.dicom_peers import free_port
from tests.node_harness import PROJECT, REFERENCE_MODELS, poll, stop_bentoml


def test_round_trip_and_the_memory_is_freed():
    reader = SharedTensorReader()
    with shared_tensor((4, 3), "float32") as (arr, ref):
        arr[...] = np.arange(12, dtype=np.float32).reshape(4, 3)
        seen = reader.array(ref)
        assert np.array_equal(seen, arr)
        assert not seen.flags.writeable
        assert (SHM_DIR / ref.name).exists()
    assert not (SHM_DIR / ref.name).exists()
    with pytest.raises(ValueError, match="does not exist"):
        reader.array(ref)
    assert not reader._mapped, "the mapping of a removed region was kept"


def test_a_reused_staging_region_is_mapped_once_and_shows_each_new_batch():
    reader = SharedTensorReader()
    with SharedBuffer(6 * 4) as staging:
        for value in (1.0, 2.0):
            arr, ref = staging.tensor((2, 3))
            arr[...] = value
            assert np.all(reader.array(ref) == value)
        mapping = reader._mapped[staging.name][1]
        small, ref = staging.tensor((1, 2))
        small[...] = 5.0
        assert reader.array(ref).shape == (1, 2) and reader._mapped[staging.name][1] is mapping
    reader.close()


def test_the_reader_keeps_at_most_max_mapped_regions():
    reader = SharedTensorReader(max_mapped=2)
    with SharedBuffer(4) as a, SharedBuffer(4) as b, SharedBuffer(4) as c:
        for buf in (a, b, c):
            reader.array(buf.tensor((1,))[1])
        assert list(reader._mapped) == [b.name, c.name]


@pytest.mark.parametrize("name", ["../etc/passwd", "befund-../../x", "other-" + "0" * 32,
                                  "befund-" + "0" * 31 + "/"])
def test_names_that_are_not_ours_never_become_paths(name):
    with pytest.raises(ValueError, match="not a befund shared tensor"):
        SharedTensorReader().array(SharedTensor(name=name, shape=[1], dtype="float32"))


def test_a_shape_that_does_not_fit_the_memory_is_refused():
    with shared_tensor((2, 2)) as (_, ref):
        lying = SharedTensor(name=ref.name, shape=[4, 4], dtype="float32")
        with pytest.raises(ValueError, match="its shape needs"):
            SharedTensorReader().array(lying)
    with SharedBuffer(16) as staging, pytest.raises(ValueError, match="the buffer has 16"):
        staging.tensor((4, 4))


@pytest.fixture(scope="module")
def model_service(tmp_path_factory):
    var = tmp_path_factory.mktemp("models-var")
    (var / "spool").mkdir()
    port = free_port()
    env = {**os.environ, "BEFUND_VAR_DIR": str(var), "BEFUND_MODELS_DIR": str(REFERENCE_MODELS)}
    log = open(var / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.model_service:ModelService",
         "--port", str(port), "--host", "127.0.0.1", "--working-dir", str(PROJECT)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (var / "serve.log").read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        poll(ready, 120, 0.25, "model service ready")
        yield url
    finally:
        stop_bentoml(proc)
        log.close()


def _post(url: str, body: dict) -> tuple[int, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_infer_shared_equals_raw_onnxruntime(model_service):
    card = load_card(PROJECT / "models" / "ich_ct")
    raw = Predictor(card, build_session(card, "cpu", 1))
    rng = np.random.default_rng(7)
    batches = [rng.random((n, 9, 128, 128), dtype=np.float32) for n in (5, 2)]
    with shared_tensor(batches[0].shape) as (a, ref_a), shared_tensor(batches[1].shape) as (b, ref_b):
        a[...], b[...] = batches
        status, out = _post(f"{model_service}/infer_shared",
                            {"tensors": [ref_a.model_dump(), ref_b.model_dump()]})
    assert status == 200, out
    assert [np.asarray(o).shape for o in out] == [(5, 1), (2, 1)]
    for got, batch in zip(out, batches):
        assert np.allclose(np.asarray(got), raw(batch), atol=1e-4)


def test_infer_shared_refuses_foreign_names_and_unknown_models(model_service):
    status, text = _post(f"{model_service}/infer_shared",
                         {"tensors": [{"name": "../../etc/passwd", "shape": [1, 9, 128, 128],
                                       "dtype": "float32"}]})
    assert status >= 400 and "not a befund shared tensor" in str(text)
    with shared_tensor((1, 9, 128, 128), model="nope@9") as (_, ref):
        status, text = _post(f"{model_service}/infer_shared", {"tensors": [ref.model_dump()]})
    assert status == 404 and "not loaded" in str(text)
    assert not (SHM_DIR / ref.name).exists(), "a shared tensor outlived its call"


def test_the_lean_route_equals_raw_onnxruntime_and_reuses_its_connection(model_service):
    card = load_card(PROJECT / "models" / "ich_ct")
    raw = Predictor(card, build_session(card, "cpu", 1))
    rng = np.random.default_rng(11)
    batches = [rng.random((n, 9, 128, 128), dtype=np.float32) for n in (3, 1)]

    async def calls() -> list[list[np.ndarray]]:
        client = SharedInferClient(model_service)
        try:
            with shared_tensor(batches[0].shape) as (a, ref_a), \
                    shared_tensor(batches[1].shape, model=card.key) as (b, ref_b):
                a[...], b[...] = batches
                first = await client.infer([ref_a, ref_b])
                assert len(client._idle) == 1, "the connection was not kept for the next call"
                client._idle[0][1].transport.abort()  # as when the server drops an idle connection
                second = await client.infer([ref_b])
            return [first, second]
        finally:
            await client.close()

    first, second = asyncio.run(calls())
    assert [o.shape for o in first] == [(3, 1), (1, 1)]
    for got, batch in zip(first, batches, strict=True):
        assert np.allclose(got, raw(batch), atol=1e-4)
    assert np.array_equal(second[0], first[1])


def test_the_lean_route_refuses_foreign_names_unknown_models_and_bad_bodies(model_service):
    async def refused(tensors) -> SharedInferError:
        client = SharedInferClient(model_service)
        try:
            with pytest.raises(SharedInferError) as caught:
                await client.infer(tensors)
            return caught.value
        finally:
            await client.close()

    foreign = SharedTensor(name="../../etc/passwd", shape=[1, 9, 128, 128], dtype="float32")
    error = asyncio.run(refused([foreign]))
    assert error.status == 400 and "not a befund shared tensor" in str(error)
    with shared_tensor((1, 9, 128, 128), model="nope@9") as (_, ref):
        error = asyncio.run(refused([ref]))
    assert error.status == 404 and "not loaded" in str(error)
    status, text = _post(f"{model_service}/shm/infer", {"tensor": []})
    assert status == 400 and "bad request" in str(text)
