"""Workers' way to remote model services (`model_services: [http://gpu1:3001, ...]`).

Each series goes, by path, to the least busy replica that is ready (`POST /analyse`, the
model service's own endpoint; the spool is shared, so the paths are the same there). A replica
that fails a call (refused, reset, killed mid-call, 5xx) is set aside and the series goes to
another one at once, so a study does not fail because one model host went away; a replica set
aside is asked `/readyz` again after `RECHECK_S` and takes calls again when it answers 200.
When none is ready, the call waits up to `WAIT_FOR_REPLICA_S` for one, then fails as one
attempt of the job (the job runner retries it later).

Why HTTP bodies, not shared memory: /dev/shm is one host's; the shared-memory path
(service/shared_client.py) stays for the model service started on the worker's own host.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("befund.jobs")

RECHECK_S = 2.0  # a replica set aside is asked /readyz again after this long
WAIT_FOR_REPLICA_S = 60.0  # no replica ready: wait this long for one before the attempt fails
PROBE_TIMEOUT_S = 2.0
MAX_ANSWER_BYTES = 64 * 1024**2  # an analysis answer (findings, per-slice scores) is far smaller


class NoReplica(RuntimeError):
    """No model service answered; the job's attempt fails and is retried later."""


class RefusedByReplica(RuntimeError):
    """A model service refused the request itself (4xx): another replica would refuse it too."""


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    ready: bool = True  # until a call or a probe says otherwise
    recheck_at: float = 0.0
    calls: int = 0
    failures: int = 0


class ModelReplicas:
    def __init__(self, urls: tuple[str, ...] | list[str], timeout_s: float) -> None:
        if not urls:
            raise ValueError("model_services is empty")
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    def analyse(self, model_key: str, paths: list[str]) -> dict[str, Any]:
        """The model service's `analyse(model, paths)` at some ready replica; another on failure."""
        body = json.dumps({"model": model_key, "paths": paths}).encode()
        deadline = time.monotonic() + WAIT_FOR_REPLICA_S
        tried: set[str] = set()
        last_error = "no replica is ready"
        while True:
            replica = self._take(exclude=tried)
            if replica is None:
                if time.monotonic() > deadline:
                    raise NoReplica(f"no model service answered ({', '.join(r.url for r in self.replicas)}): "
                                    f"{last_error}")
                tried.clear()  # every replica had its turn: wait for one to come back
                time.sleep(RECHECK_S)  # wait under the deadline above for a replica's recheck time
                continue
            try:
                return self._call(replica, body)
            except RefusedByReplica:
                self._done(replica, ok=True)
                raise
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self._done(replica, ok=False)
                tried.add(replica.url)
                last_error = f"{replica.url}: {getattr(exc, 'reason', exc)}"
                log.warning("model service %s failed a call (%s); trying another replica", replica.url,
                            str(getattr(exc, "reason", exc))[:200])

    def _call(self, replica: Replica, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - config checked the http(s) URL
            f"{replica.url}/analyse", data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:  # noqa: S310 - checked http(s) URL
                raw = answer.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise RefusedByReplica(f"{replica.url} refused the analysis: HTTP {exc.code}") from exc
            raise
        if len(raw) > MAX_ANSWER_BYTES:
            raise ValueError(f"answer longer than {MAX_ANSWER_BYTES} bytes")
        result = json.loads(raw)
        self._done(replica, ok=True)
        return result

    def _take(self, exclude: set[str]) -> Replica | None:
        """The least busy ready replica not in `exclude` (probing those whose recheck is due)."""
        now = time.monotonic()
        with self._lock:
            due = [r for r in self.replicas if not r.ready and r.recheck_at <= now and r.url not in exclude]
        for replica in due:  # outside the lock: a probe takes up to PROBE_TIMEOUT_S
            ok = self._probe(replica)
            with self._lock:
                replica.ready, replica.recheck_at = ok, time.monotonic() + RECHECK_S
            if ok:
                log.info("model service %s is ready again", replica.url)
        with self._lock:
            ready = [r for r in self.replicas if r.ready and r.url not in exclude]
            if not ready:
                return None
            best = min(ready, key=lambda r: (r.in_flight, r.calls))
            best.in_flight += 1
            best.calls += 1
            return best

    def _done(self, replica: Replica, ok: bool) -> None:
        with self._lock:
            replica.in_flight = max(0, replica.in_flight - 1)
            if not ok:
                replica.failures += 1
                replica.ready = False
                replica.recheck_at = time.monotonic() + RECHECK_S

    def _probe(self, replica: Replica) -> bool:
        try:
            with urllib.request.urlopen(f"{replica.url}/readyz", timeout=PROBE_TIMEOUT_S) as r:  # noqa: S310
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def describe(self) -> list[dict[str, Any]]:
        """Each replica's state, for the log and the API."""
        with self._lock:
            return [{"url": r.url, "ready": r.ready, "in_flight": r.in_flight, "calls": r.calls,
                     "failures": r.failures} for r in self.replicas]
