"""The job runner: leases jobs from the state DB, has the model service analyse them, encodes the
result objects, and queues their deliveries — in that order, each step restartable.

An attempt passes through stages (service/job_failures.py): analysis, SR encoding, SEG
encoding, saving the files, building the deliveries, recording the result. A failure in any
of them counts as an attempt (the lease counted it in the state DB before the attempt began,
so a node that dies in the same place on every start also runs out of attempts); the job is
retried with backoff, and an analysis that succeeded is kept, so a retry does not run the
model again. After `job_max_attempts` the job ends as `failed`, "not analysed: internal error
in <stage>", and still produces a "not analysed" SR, so the PACS and the worklist never read
silence as a negative result: from the source header, or, when that header is what broke the
SR encoder, from a reduced copy of it (pipelines/source_header.py); when even that cannot be
encoded or saved, the reason says so and the worklist shows it without an SR.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard
from pipelines.result_uids import result_uids
from pipelines.tasks import task_of
from service import metrics
from service.config import Config
from service.durable_files import save_dataset_durably
from service.job_failures import FaultInjection, Stage, describe_error, frames_of
from service.state_db import Job, StateDB

log = logging.getLogger("befund.jobs")

Analyse = Callable[[str, list[str]], dict[str, Any]]
MAX_RETRY_DELAY_S = 60.0


@dataclass
class Attempt:
    """One attempt of a job: its state-DB row and the stage it is in."""

    job: Job
    stage: Stage = Stage.ANALYSIS

    @property
    def id(self) -> int:
        return self.job.id


class JobRunner:
    def __init__(self, db: StateDB, cards: dict[str, ModelCard], analyse: Analyse, config: Config,
                 owner: str, on_queued: Callable[[], None] = lambda: None):
        self.db = db
        self.cards = cards
        self.analyse = analyse
        self.config = config
        self.owner = owner
        self.on_queued = on_queued  # wakes the outbox
        self.faults = FaultInjection(config.fault_injection, config.fault_delays)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        requeued = self.db.requeue_orphans(self.owner)
        if requeued:
            log.info("resuming %d job(s) left running by a previous process", requeued)
        for i in range(max(1, self.config.job_workers)):
            t = threading.Thread(target=self._loop, name=f"job-runner-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def alive(self) -> bool:
        """True while every runner thread runs (readiness and liveness probes ask)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a locked or failing state DB must not end the runner
                log.exception("job runner cannot reach the state DB; trying again in 1 s")
                self._stop.wait(1.0)

    def _step(self) -> None:
        """Lease one job and run one attempt of it, or wait for one: until a job is created
        (the state DB's notification, from any instance), a retry falls due or a lease runs out."""
        job = self.db.lease_job(self.owner, self.config.job_lease_s)
        if job is None:
            due = self.db.next_job_at()
            wait = self.db.poll_cap_s if due is None else min(self.db.poll_cap_s, due - time.time())
            self.wake.wait(max(0.05, wait))
            self.wake.clear()
            return
        with self._lease_kept(job.id):
            if job.attempts > self.config.job_max_attempts:
                self._interrupted_too_often(job)
                return
            attempt = Attempt(job)
            try:
                self.run_job(attempt)
            except Exception as exc:  # noqa: BLE001 - any failure in any stage is one attempt
                self._attempt_failed(attempt, exc)

    @contextmanager
    def _lease_kept(self, job_id: int) -> Iterator[None]:
        """Renew the job's lease while this attempt runs, so a long analysis is not leased twice."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.config.job_lease_s / 4):
                try:
                    self.db.renew_job_lease(job_id, self.owner, self.config.job_lease_s)
                except Exception as exc:  # noqa: BLE001 - the next renewal may get through
                    log.warning("job %s: lease not renewed (%s)", job_id, type(exc).__name__)

        renewer = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()

    # --- one attempt ------------------------------------------------------------------------

    def run_job(self, attempt: Attempt) -> None:
        job = attempt.job
        key = job.key
        card = self.cards.get(key)
        log.info("job %s: %s%s on series %s run %s (attempt %s)", job.id, key,
                 " (shadow)" if job.shadow else "", job.series_uid, job.run, job.attempts)
        if card is None:
            result = AnalysisResult.not_analysed(f"model {key} is no longer installed")
            self._finish(attempt, None, result, "failed", result.reason)
            return
        purged = self.db.purged_instances(job.series_uid)
        if purged:
            result = AnalysisResult.not_analysed(
                f"{purged} earlier instance(s) of this series were removed from the spool by "
                f"retention before this run; the series cannot be analysed as a whole. Resend "
                f"the complete series to analyse it. {self._earlier_verdict(job)}")
            self._finish(attempt, card, result, "not_analysed", result.reason)
            return
        result = self._at_site_threshold(job, card, self._analysis(attempt, key, card))
        state = "done" if result.analysed else "not_analysed"
        self._finish(attempt, card, result, state, "" if result.analysed else result.reason)

    def _enter(self, attempt: Attempt, stage: Stage) -> None:
        """Note the stage in the state DB (a crash in it is reported with it) and run the test hook."""
        attempt.stage = stage
        self.db.record_job_stage(attempt.id, stage.value)
        self.faults.check(stage, attempt.job.series_uid)

    def _analysis(self, attempt: Attempt, key: str, card: ModelCard) -> AnalysisResult:
        """The model service's result, or the one an earlier attempt of this job kept."""
        job = attempt.job
        if job.analysis:
            log.info("job %s: the analysis of an earlier attempt is kept; not run again", job.id)
            return AnalysisResult.from_dict(job.analysis)
        self._enter(attempt, Stage.ANALYSIS)
        paths = self.db.series_paths(job.series_uid)
        started = time.time()
        raw = self.analyse(key, paths)
        result = AnalysisResult.from_dict(raw)
        for stage, seconds in result.timings.items():
            metrics.STAGE_SECONDS.labels(card.name, stage).observe(seconds)
        metrics.STAGE_SECONDS.labels(card.name, "model_service").observe(time.time() - started)
        self.db.keep_job_analysis(job.id, result.to_dict())
        return result

    def _at_site_threshold(self, job: Job, card: ModelCard, result: AnalysisResult) -> AnalysisResult:
        """The verdict at the sending site's operating point, when the config names one
        (service/site_thresholds.py); else the card's, unchanged."""
        from pipelines.operating_point import at_threshold
        from service.site_thresholds import CARD, operating_point, sending_site, wants_institution

        rules = self.config.site_thresholds
        if not rules or not result.analysed:
            return result
        ae, institution = sending_site(self.db, job.series_uid,
                                       wants_institution(rules, card.name, card.version))
        point = operating_point(rules, card.name, card.version, card.postprocessing.threshold,
                                ae, institution)
        if point.source == CARD:
            return result
        log.info("job %s: threshold %g (%s) instead of the card's %g", job.id, point.threshold,
                 point.source, card.postprocessing.threshold)
        return at_threshold(result, card, point.threshold, point.source)

    def _earlier_verdict(self, job: Job) -> str:
        """What the last analysed run of this series and model said, for the reader of a reason."""
        row = self.db.last_done_job(job.series_uid, job.model_name, job.run)
        if row is None:
            return "No earlier run analysed it."
        earlier = row.result
        verdict = "present" if earlier.get("present") else "absent"
        certainty = earlier.get("certainty")
        shown = f" (certainty {100 * certainty:.0f} %)" if isinstance(certainty, (int, float)) else ""
        return f"Run {row.run} found the finding {verdict}{shown}; that result stands."

    def _finish(self, attempt: Attempt, card: ModelCard | None, result: AnalysisResult,
                state: str, error: str) -> None:
        job = attempt.job
        started = time.time()
        files = self._encode(attempt, card, result) if card is not None else []
        encode_s = time.time() - started
        summary = self._summary(card, result, files, encode_s)
        deliveries = self._deliveries(attempt, files, result)
        self._enter(attempt, Stage.RESULT_ROW)
        self.db.finish_job(job.id, state, summary, error, deliveries)
        self._count(job, card, result, state, encode_s)

    def _summary(self, card: ModelCard | None, result: AnalysisResult, files: list[Path],
                 encode_s: float) -> dict[str, Any]:
        summary = result.to_dict()
        summary["timings"] = {**result.timings, "encode": encode_s}
        summary["files"] = [str(f) for f in files]
        if card is not None:
            summary.update(task_of(card).worklist_summary(card, result))
        return summary

    def _count(self, job: Job, card: ModelCard | None, result: AnalysisResult,
               state: str, encode_s: float) -> None:
        name = card.name if card else job.model_name
        if job.shadow:  # a shadow version's verdicts must not count as the model's flags
            name += ":shadow"
        metrics.STAGE_SECONDS.labels(name, "encode").observe(encode_s)
        metrics.JOB_OUTCOMES.labels(name, state).inc()
        verdict = ("present" if result.present else "absent") if result.analysed else "not_analysed"
        metrics.FINDINGS.labels(name, verdict).inc()
        if "tiles_analysed" in result.measurements:
            metrics.WSI_TILES.labels(name).inc(result.measurements["tiles_analysed"])
        if "tissue_fraction" in result.measurements:
            metrics.WSI_TISSUE_FRACTION.observe(result.measurements["tissue_fraction"])
        log.info("job %s %s: %s%s", job.id, state, verdict,
                 f" ({result.reason})" if result.reason else "")
        self.on_queued()

    def _deliveries(self, attempt: Attempt, files: list[Path],
                    result: AnalysisResult) -> list[tuple[str, str, dict]]:
        from service.delivery_rules import destinations_for, job_facts

        self._enter(attempt, Stage.DELIVERIES)
        job = attempt.job
        out: list[tuple[str, str, dict]] = []
        if job.shadow:  # kept in the state DB and under results/, never sent anywhere
            return out
        if files:
            facts = job_facts(self.db, job, result.analysed, result.present)
            for dest in destinations_for(self.config.destinations, self.config.delivery_rules, facts):
                out.append(("dicom", dest.name, {"files": [str(f) for f in files]}))
        if self.config.hl7.host and self.config.hl7.port:
            out.append(("hl7", f"{self.config.hl7.host}:{self.config.hl7.port}", {}))
        for url in self.config.webhooks:
            out.append(("webhook", url, {}))
        return out

    def _encode(self, attempt: Attempt, card: ModelCard, result: AnalysisResult,
                reduced_header: bool = False) -> list[Path]:
        """Write the SR (and the SEG, when the task's result has one) durably under
        var/results/job-<id>/.

        `reduced_header`: build the SR from pipelines/source_header.py's copy of the header.
        """
        job = attempt.job
        task = task_of(card)
        self._enter(attempt, Stage.ENCODE_SR)
        # headers come from files still in the spool (retention may have removed older ones)
        instances = [r for r in self.db.series_instances(job.series_uid) if r["purged_at"] is None]
        by_uid = {r["sop_instance_uid"]: r for r in instances}
        wanted = [u for u in task.referenced_instances(result) if u in by_uid]
        if not wanted and instances:
            wanted = [instances[0]["sop_instance_uid"]]
        headers = [pydicom.dcmread(by_uid[u]["path"], stop_before_pixels=True)
                   for u in dict.fromkeys(wanted)]
        if reduced_header:
            from pipelines.source_header import minimal_source_header

            headers = [minimal_source_header(h) for h in headers]
        uids = result_uids(job.series_uid, card.key, job.run)
        earlier = self.db.previous_run(job.series_uid, card.name, card.version, job.run)
        sr = task.build_sr(card, result, headers, uids, job.run, (
            result_uids(job.series_uid, card.key, earlier) if earlier is not None else None))
        seg = None
        if task.has_seg(card, result):
            self._enter(attempt, Stage.ENCODE_SEG)
            seg = task.build_seg(card, result, headers, uids, job.run)
        self._enter(attempt, Stage.SAVE)
        folder = self.config.results_path / f"job-{job.id}"
        files = [save_dataset_durably(sr, folder / "sr.dcm")]
        if seg is not None:
            files.append(save_dataset_durably(seg, folder / "seg.dcm"))
        else:  # a SEG an earlier attempt saved is no result of this one
            (folder / "seg.dcm").unlink(missing_ok=True)
        return files

    # --- failures ---------------------------------------------------------------------------

    def _private(self, job: Job) -> list[str]:
        """The study's patient identifiers, which an error text must not repeat."""
        study = self.db.study(job.study_uid) or {}
        return [study.get("patient_name") or "", study.get("patient_id") or "",
                study.get("accession") or ""]

    def _attempt_failed(self, attempt: Attempt, exc: Exception) -> None:
        job, stage = attempt.job, attempt.stage
        metrics.JOB_ATTEMPT_FAILURES.labels(stage.value).inc()
        error = describe_error(exc, self._private(job))
        if job.attempts < self.config.job_max_attempts:
            delay = min(MAX_RETRY_DELAY_S, 2.0 ** job.attempts)
            log.warning("job %s attempt %s of %s failed in %s (%s); retry in %.0f s", job.id,
                        job.attempts, self.config.job_max_attempts, stage.label, error, delay)
            log.debug("job %s failed at:\n%s", job.id, frames_of(exc))
            self.db.retry_job_later(job.id, error, delay)
            return
        log.error("job %s failed in %s after %s attempt(s) (%s) at:\n%s", job.id, stage.label,
                  job.attempts, error, frames_of(exc))
        self._give_up(job, stage, error, job.attempts)

    def _interrupted_too_often(self, job: Job) -> None:
        """The attempts ran out, the last one ended without an outcome (the node stopped during
        it, e.g. killed for memory in the same slide on every start): give up now."""
        stage = Stage.stored(job.stage)
        attempts = job.attempts - 1
        error = "the node stopped while the job was running" + (
            f"; an earlier attempt failed with {job.last_error}" if job.last_error else "")
        log.error("job %s: attempt %s of %s ended without an outcome (the node stopped in %s); "
                  "giving up", job.id, attempts, self.config.job_max_attempts, stage.label)
        self._give_up(job, stage, error, attempts)

    def _give_up(self, job: Job, stage: Stage, error: str, attempts: int) -> None:
        """End the job as failed with a "not analysed" result that names the stage and error.

        Its SR goes through the same encoder; when that fails again, once more from a reduced
        header, and when that fails too (or saving, or building the deliveries), the job is
        recorded without it and the reason says why.
        """
        reason = f"internal error in {stage.label} after {attempts} attempt(s): {error}"
        key = job.key
        card = self.cards.get(key)
        attempt = Attempt(job)
        files: list[Path] = []
        if card is not None:
            files, missing = self._not_analysed_sr(attempt, card, AnalysisResult.not_analysed(reason))
            if missing:
                reason += f"; no \"not analysed\" SR could be made: {missing}"
        try:
            deliveries = self._deliveries(attempt, files, AnalysisResult.not_analysed(reason))
        except Exception as exc:  # noqa: BLE001 - the failure is recorded without deliveries
            deliveries = []
            reason += (f"; no delivery could be queued: {Stage.DELIVERIES.label} failed "
                       f"({describe_error(exc, self._private(job))})")
        result = AnalysisResult.not_analysed(reason)
        summary = self._summary(card, result, files, 0.0)
        self.db.finish_job(job.id, "failed", summary, error, deliveries, stage=stage.value)
        self._count(job, card, result, "failed", 0.0)

    def _not_analysed_sr(self, attempt: Attempt, card: ModelCard,
                         result: AnalysisResult) -> tuple[list[Path], str]:
        """The not-analysed SR's files, or none and why."""
        try:
            return self._encode(attempt, card, result), ""
        except Exception as exc:  # noqa: BLE001 - a reduced header may still encode
            if attempt.stage is not Stage.ENCODE_SR:
                return [], f"{attempt.stage.label} failed ({describe_error(exc, self._private(attempt.job))})"
            log.warning("job %s: the \"not analysed\" SR does not encode from the source header "
                        "(%s); trying a reduced copy of it", attempt.id, type(exc).__name__)
        try:
            return self._encode(attempt, card, result, reduced_header=True), ""
        except Exception as exc:  # noqa: BLE001 - reported in the reason instead
            return [], f"{attempt.stage.label} failed ({describe_error(exc, self._private(attempt.job))})"
