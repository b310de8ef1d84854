"""A lean client for the model service's `POST /shm/infer` (tensors in shared memory).

Why not the `bentoml.depends` proxy: measured here, one call through it costs ~4.6 ms even
for an endpoint that does nothing (its httpx client ~2 ms, BentoML's API layer ~2 ms), which
is a tenth of the model time of a 64-slice CT batch. This client keeps HTTP/1.1 connections
open (over the service's Unix socket inside `bentoml serve`), writes one short JSON request and
reads one JSON answer: about 1 ms per call in all. It is for callers that make one call per
batch; a caller that sends a whole study (`analyse`) pays the proxy's cost once and needs none
of this.
"""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import unquote, urlparse

import numpy as np

from service.shared_tensors import SharedTensor

MODEL_SERVICE = "befund_models"
ROUTE = "/shm/infer"
_MAX_HEADER = 64 * 1024


class SharedInferError(RuntimeError):
    """The model service refused the call; `status` is its HTTP status."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"model service answered {status}: {detail}")
        self.status = status


class SharedInferClient:
    """`await client.infer([ref, ...])` -> one float32 array per shared tensor, in order.

    `url` is `http://host:port` or `file:///path/to/socket` (what `bentoml serve` hands a
    dependent service in BENTOML_RUNNER_MAP). Safe for many calls in flight: each takes an
    idle connection or opens one.
    """

    def __init__(self, url: str):
        parsed = urlparse(url)
        self._unix = unquote(parsed.path) if parsed.scheme == "file" else None
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @classmethod
    def for_dependency(cls, service: str = MODEL_SERVICE) -> SharedInferClient:
        """The client for `service` as a dependency inside `bentoml serve`."""
        mapping = json.loads(os.environ.get("BENTOML_RUNNER_MAP", "{}"))
        if service not in mapping:
            raise LookupError(f"{service} is not a dependency of this service (BENTOML_RUNNER_MAP)")
        return cls(mapping[service])

    async def infer(self, tensors: list[SharedTensor]) -> list[np.ndarray]:
        body = json.dumps({"tensors": [t.model_dump() for t in tensors]}).encode()
        request = (f"POST {ROUTE} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for attempt in range(2):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                status, payload, keep = await _exchange(conn, request)
            except (ConnectionError, asyncio.IncompleteReadError):
                conn[1].close()
                if reused and attempt == 0:  # the server closed an idle connection: once more
                    continue
                raise
            except BaseException:
                conn[1].close()
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn[1].close()
            break
        if status != 200:
            raise SharedInferError(status, payload.decode(errors="replace")[:500])
        return [np.asarray(o, dtype=np.float32) for o in json.loads(payload)["outputs"]]

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix is not None:
            return await asyncio.open_unix_connection(self._unix, limit=_MAX_HEADER)
        return await asyncio.open_connection(self._host, self._port, limit=_MAX_HEADER)


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                    request: bytes) -> tuple[int, bytes, bool]:
    """Send one request, read one answer: (status, body, whether the connection stays open)."""
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = (line.partition(":") for line in lines[1:] if line)
    headers = {k.strip().lower(): v.strip() for k, _, v in fields}
    if "content-length" not in headers:
        raise ConnectionError(f"answer without Content-Length ({headers.get('transfer-encoding', '?')})")
    payload = await reader.readexactly(int(headers["content-length"]))
    return status, payload, headers.get("connection", "").lower() != "close"
