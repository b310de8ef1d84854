"""Watches receiving series, declares them complete, and routes them to model jobs; answers
the explicit trigger (`POST /studies/{uid}/run`) with what will run and why the rest will not."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.model_card import ModelCard
from service import metrics
from service.completion import completion_signal, next_deadline
from service.routing import job_priority, route_series
from service.state_db import JOB_ACTIVE, PlannedJob, Series, SeriesState, StateDB

log = logging.getLogger("befund.completion")

MAX_WAIT_S = 5.0  # between looks without a notification (a late instance at another instance)


@dataclass(frozen=True)
class RunAnswer:
    """What `POST /studies/{uid}/run` does for one series: start a run (or complete it now), or
    not, and why."""

    series_uid: str
    runs: bool
    reason: str


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
        """Complete and route what is due; return seconds until the next deadline. Deadlines
        come from the state DB's rows (any instance's associations and instances); an
        association's end or the API's trigger, at any instance, wakes the watcher sooner."""
        wait = min(MAX_WAIT_S, self.db.poll_cap_s)
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

    def request_run(self, study_uid: str, force: bool = False) -> list[RunAnswer] | None:
        """The explicit trigger for every series of a study; None when the study is unknown.

        A series still receiving completes now. One that changed since its last run, or that a
        model has not analysed yet, runs. One whose run is queued or running, or with nothing
        new since its last run, does not: unless `force`, which starts a new run of a series
        with nothing new (never a second one beside a run still in progress).
        """
        answers = [self._answer(s, force) for s in self.db.series_of(study_uid)]
        if not answers:
            return None
        if any(a.runs for a in answers):
            self.wake.set()
        return answers

    def _answer(self, series: Series, force: bool) -> RunAnswer:
        uid = series.series_uid
        route = route_series(series, self.cards)
        if not route.cards:
            if series.state is SeriesState.RECEIVING:
                self.db.request_ready(uid)  # complete now: flagged "not analysed" with the reason
            return RunAnswer(uid, False, route.reason)
        if series.state is SeriesState.RECEIVING:
            self.db.request_ready(uid)
            return RunAnswer(uid, True, "completed now")
        latest = {(j.model_name, j.model_version): j for j in self.db.runs_of(uid)}
        for job in latest.values():
            if job.state in JOB_ACTIVE and not job.shadow:  # a shadow run waiting blocks nothing
                return RunAnswer(uid, False, f"run {job.run} ({job.model_name} "
                                             f"{job.model_version}) is already {job.state}")
        lasts = [latest.get((c.name, c.version)) for c in route.cards]
        if any(j is None or j.series_revision != series.revision for j in lasts):
            self.db.request_ready(uid)
            return RunAnswer(uid, True, "changed since its last run, or a model has not run on it")
        if force:
            self.db.request_ready(uid, again=True)
            return RunAnswer(uid, True, "run again on request")
        newest = max(lasts, key=lambda j: j.run)
        return RunAnswer(uid, False, f"nothing new since run {newest.run} ({newest.model_name} "
                                     f"{newest.model_version}, {newest.state}); ask with "
                                     "force to run it again")

    def _route(self, series: Series, signal: str, now: float) -> int:
        """Complete the series and create its jobs in one transaction (`complete_series`):
        when another instance does it first, or an instance arrived since it was read, nothing
        happens here (the next look sees the new state)."""
        uid, revision = series.series_uid, series.revision
        count = series.instance_count
        route = route_series(series, self.cards)
        if route.cards:
            state, reason = "routed", ""
        elif route.ignored:
            state, reason = "ignored", route.reason
        else:
            state, reason = "no_model", route.reason
        planned = [PlannedJob(c.name, c.version, job_priority(c), c.mode) for c in route.cards]
        created = self.db.complete_series(uid, revision, signal, now, planned, state, reason)
        if created is None:
            return 0
        metrics.SERIES_COMPLETED.labels(signal).inc()
        for job_id, job in created:
            log.info("series %s complete (%s, %d instances): job %s for %s@%s%s", uid, signal, count,
                     job_id, job.model_name, job.model_version,
                     " (shadow)" if job.mode == "shadow" else "")
        if state == "no_model":
            log.info("series %s complete (%s): %s", uid, signal, reason)
        return len(created)
