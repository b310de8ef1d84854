"""Watches receiving series, declares them complete, and routes them to model jobs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pipelines.model_card import ModelCard
from service import metrics
from service.completion import completion_signal, next_deadline
from service.routing import job_priority, route_series
from service.state_db import StateDB

log = logging.getLogger("befund.completion")


class CompletionWatcher:
    def __init__(self, db: StateDB, cards: list[ModelCard], settle_s: float, quiet_s: float,
                 on_jobs: Callable[[], None]):
        self.db = db
        self.cards = cards
        self.settle_s = settle_s
        self.quiet_s = quiet_s
        self.on_jobs = on_jobs
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="completion", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """True while the completion thread runs (readiness and liveness probes ask)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.tick(time.time())
            except Exception:  # noqa: BLE001 - keep watching whatever one series does
                log.exception("completion check failed")
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()

    def tick(self, now: float) -> float:
        """Complete and route what is due; return seconds until the next deadline (<= 1 s)."""
        wait = 1.0
        created = 0
        for series in self.db.series_receiving():
            signal = completion_signal(series, now, self.settle_s, self.quiet_s)
            if not signal:
                wait = min(wait, max(0.02, next_deadline(series, self.settle_s, self.quiet_s) - now))
                continue
            created += self._route(series, signal, now)
        if created:
            self.on_jobs()
        return wait

    def _route(self, series: dict, signal: str, now: float) -> int:
        uid, count = series["series_uid"], series["instance_count"]
        route = route_series(series, self.cards)
        created = 0
        for card in route.cards:
            job_id = self.db.create_job_if_new(series, card.name, card.version,
                                               job_priority(card), now)
            if job_id is not None:
                created += 1
                log.info("series %s complete (%s, %d instances): job %s for %s", uid, signal,
                         count, job_id, card.key)
        if route.cards:
            state, reason = "routed", ""
        elif route.ignored:
            state, reason = "ignored", route.reason
        else:
            state, reason = "no_model", route.reason
            log.info("series %s complete (%s): %s", uid, signal, reason)
        if self.db.mark_series(uid, state, reason, completed_by=signal, at=now, if_count=count):
            metrics.SERIES_COMPLETED.labels(signal).inc()
        return created
