"""The job runner: leases jobs from the state DB, has the model service analyse them, encodes the
result objects, and queues their deliveries — in that order, each step restartable.

A job that the model service cannot finish is retried with backoff; after the last attempt it
ends as `failed` and still produces a "not analysed" SR, so the PACS and the worklist never
read silence as a negative result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard
from pipelines.result_uids import result_uids
from service import metrics
from service.config import Config
from service.durable_files import save_dataset_durably
from service.state_db import StateDB

log = logging.getLogger("befund.jobs")

Analyse = Callable[[str, list[str]], dict[str, Any]]


class JobRunner:
    def __init__(self, db: StateDB, cards: dict[str, ModelCard], analyse: Analyse, config: Config,
                 owner: str, on_queued: Callable[[], None] = lambda: None):
        self.db = db
        self.cards = cards
        self.analyse = analyse
        self.config = config
        self.owner = owner
        self.on_queued = on_queued  # wakes the outbox
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
        """Lease one job and run it, or wait up to 0.5 s for one."""
        job = self.db.lease_job(self.owner, self.config.job_lease_s)
        if job is None:
            self.wake.wait(0.5)
            self.wake.clear()
            return
        try:
            self.run_job(job)
        except Exception:  # noqa: BLE001 - a bug in one job must not stop the runner
            log.exception("job %s crashed in the runner; it will be retried", job["id"])
            self.db.retry_job_later(job["id"], "internal error in the job runner", 5.0)

    def run_job(self, job: dict[str, Any]) -> None:
        key = f"{job['model_name']}@{job['model_version']}"
        card = self.cards.get(key)
        log.info("job %s: %s on series %s run %s (attempt %s)", job["id"], key,
                 job["series_uid"], job["run"], job["attempts"])
        if card is None:
            result = AnalysisResult.not_analysed(f"model {key} is no longer installed")
            self._finish(job, None, result, "failed", result.reason)
            return
        purged = self.db.purged_instances(job["series_uid"])
        if purged:
            result = AnalysisResult.not_analysed(
                f"{purged} earlier instance(s) of this series were removed from the spool by "
                f"retention before this run; the series cannot be analysed as a whole. Resend "
                f"the complete series to analyse it. {self._earlier_verdict(job)}")
            self._finish(job, card, result, "not_analysed", result.reason)
            return
        paths = self.db.series_paths(job["series_uid"])
        started = time.time()
        try:
            raw = self.analyse(key, paths)
            result = AnalysisResult.from_dict(raw)
        except Exception as exc:  # noqa: BLE001 - any failure of the model service is retried
            error = f"{type(exc).__name__}: {exc}"[:500]
            if job["attempts"] < self.config.job_max_attempts:
                delay = min(60.0, 2.0 ** job["attempts"])
                log.warning("job %s attempt %s failed (%s); retry in %.0f s", job["id"],
                            job["attempts"], error, delay)
                self.db.retry_job_later(job["id"], error, delay)
                return
            result = AnalysisResult.not_analysed(
                f"analysis failed after {job['attempts']} attempts: {error}")
            self._finish(job, card, result, "failed", error)
            return
        for stage, seconds in result.timings.items():
            metrics.STAGE_SECONDS.labels(card.name, stage).observe(seconds)
        metrics.STAGE_SECONDS.labels(card.name, "model_service").observe(time.time() - started)
        state = "done" if result.analysed else "not_analysed"
        self._finish(job, card, result, state, "" if result.analysed else result.reason)

    def _earlier_verdict(self, job: dict[str, Any]) -> str:
        """What the last analysed run of this series and model said, for the reader of a reason."""
        row = self.db.last_done_job(job["series_uid"], job["model_name"], job["run"])
        if row is None:
            return "No earlier run analysed it."
        earlier = json.loads(row["result"] or "{}")
        verdict = "present" if earlier.get("present") else "absent"
        certainty = earlier.get("certainty")
        shown = f" (certainty {100 * certainty:.0f} %)" if isinstance(certainty, (int, float)) else ""
        return f"Run {row['run']} found the finding {verdict}{shown}; that result stands."

    def _finish(self, job: dict[str, Any], card: ModelCard | None, result: AnalysisResult,
                state: str, error: str) -> None:
        started = time.time()
        files = self._encode(job, card, result) if card is not None else []
        encode_s = time.time() - started
        summary = result.to_dict()
        summary["timings"] = {**result.timings, "encode": encode_s}
        summary["files"] = [str(f) for f in files]
        if card is not None:
            summary["finding"] = {"value": card.finding.code.value,
                                  "scheme": card.finding.code.scheme,
                                  "meaning": card.finding.code.meaning}
            summary["priority"] = (card.postprocessing.priority_when_positive
                                   if result.present else "normal")
        self.db.finish_job(job["id"], state, summary, error, self._deliveries(job, files, result))
        name = card.name if card else job["model_name"]
        metrics.STAGE_SECONDS.labels(name, "encode").observe(encode_s)
        metrics.JOB_OUTCOMES.labels(name, state).inc()
        verdict = ("present" if result.present else "absent") if result.analysed else "not_analysed"
        metrics.FINDINGS.labels(name, verdict).inc()
        if "tiles_analysed" in result.measurements:
            metrics.WSI_TILES.labels(name).inc(result.measurements["tiles_analysed"])
        if "tissue_fraction" in result.measurements:
            metrics.WSI_TISSUE_FRACTION.observe(result.measurements["tissue_fraction"])
        log.info("job %s %s: %s%s", job["id"], state, verdict,
                 f" ({result.reason})" if result.reason else "")
        self.on_queued()

    def _deliveries(self, job: dict[str, Any], files: list[Path],
                    result: AnalysisResult) -> list[tuple[str, str, dict]]:
        from service.delivery_rules import destinations_for, job_facts

        out: list[tuple[str, str, dict]] = []
        if files:
            facts = job_facts(self.db, job, result.analysed, result.present)
            for dest in destinations_for(self.config.destinations, self.config.delivery_rules, facts):
                out.append(("dicom", dest.name, {"files": [str(f) for f in files]}))
        if self.config.hl7.host and self.config.hl7.port:
            out.append(("hl7", f"{self.config.hl7.host}:{self.config.hl7.port}", {}))
        for url in self.config.webhooks:
            out.append(("webhook", url, {}))
        return out

    def _encode(self, job: dict[str, Any], card: ModelCard, result: AnalysisResult) -> list[Path]:
        """Write the SR (and, for slides, the heatmap SEG) durably under var/results/job-<id>/."""
        from pipelines.sr_encoding import build_result_sr

        # headers come from files still in the spool (retention may have removed older ones)
        instances = [r for r in self.db.series_instances(job["series_uid"]) if r["purged_at"] is None]
        by_uid = {r["sop_instance_uid"]: r for r in instances}
        wanted = [k.sop_instance_uid for k in result.key_images if k.sop_instance_uid in by_uid]
        if result.heatmap and result.heatmap.get("level_sop_instance_uid") in by_uid:
            wanted.append(result.heatmap["level_sop_instance_uid"])
        if not wanted and instances:
            wanted = [instances[0]["sop_instance_uid"]]
        headers = [pydicom.dcmread(by_uid[u]["path"], stop_before_pixels=True)
                   for u in dict.fromkeys(wanted)]
        uids = result_uids(job["series_uid"], card.key, job["run"])
        folder = self.config.results_path / f"job-{job['id']}"
        sr = build_result_sr(card, result, headers, uids, job["run"])
        files = [save_dataset_durably(sr, folder / "sr.dcm")]
        if result.analysed and result.heatmap:
            from pipelines.seg_encoding import build_heatmap_seg

            slide = next((h for h in headers
                          if h.SOPInstanceUID == result.heatmap.get("level_sop_instance_uid")),
                         headers[0])
            seg = build_heatmap_seg(card, result, slide, uids.seg_series_uid, uids.seg_sop_uid,
                                    job["run"])
            files.append(save_dataset_durably(seg, folder / "seg.dcm"))
        return files
