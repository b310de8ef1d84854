"""The outbox: delivers results (DICOM C-STORE, HL7 ORU^R01, webhooks) until they are accepted.

Rows live in the state DB, so a crash or restart loses nothing. Retries back off
exponentially with jitter; an entry older than `dead_letter_after_s` becomes `dead` and waits
for a resend through the API. Result UIDs are deterministic, so a retry after an ambiguous
failure re-sends the same object, never a duplicate with new UIDs.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # noqa: F401 - keeps pynetdicom's registry loaded

from service import metrics
from service.config import Config, Destination
from service.delivery_errors import DeliveryError
from service.state_db import Delivery, Job, StateDB

log = logging.getLogger("befund.outbox")

# Send what dciodvfy and every PACS can read; pynetdicom's defaults include Deflated.
RESULT_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
ROUND = 16  # deliveries attempted before the outbox looks at its stop flag and the clock again


def backoff_delay(attempts: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full-range jitter (0.5x to 1.5x) so retries do not synchronise."""
    base = min(max_s, initial_s * (2 ** max(0, attempts - 1)))
    return base * rng.uniform(0.5, 1.5)


def cstore_files(dest: Destination, calling_ae: str, files: list[str], timeout_s: float,
                 tls_context: Any = None) -> None:
    """C-STORE the files in one association; raise DeliveryError unless every one succeeded."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class, RESULT_TRANSFER_SYNTAXES)
    tls_args = (tls_context, dest.host) if tls_context is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port}: {exc}") from exc
    if not assoc.is_established:
        raise DeliveryError(f"{dest.ae_title}@{dest.host}:{dest.port} refused the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise DeliveryError(f"no C-STORE response for {ds.SOPInstanceUID} (timeout or abort)")
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                raise DeliveryError(f"{dest.ae_title} answered 0x{code:04X} for {ds.SOPInstanceUID}")
    finally:
        if assoc.is_established:
            assoc.release()


class Outbox:
    def __init__(self, db: StateDB, config: Config, tls_context: Any = None,
                 rng: random.Random | None = None, owner: str = ""):
        self.db = db
        self.config = config
        self.owner = owner or config.instance  # the name this instance leases deliveries in
        self.tls_context = tls_context
        self.rng = rng or random.Random()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._destinations = {d.name: d for d in config.destinations}

    def start(self) -> None:
        released = self.db.release_orphan_deliveries(self.owner)
        if released:
            log.info("%d delivery(ies) a previous process held are due again", released)
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """True while the delivery thread runs (readiness and liveness probes ask)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._deliver_due()
            except Exception:  # noqa: BLE001 - the delivery loop must survive anything
                log.exception("outbox loop error")
                wait = 1.0
            if wait:
                self.wake.wait(wait)
                self.wake.clear()

    def _deliver_due(self) -> float:
        """Attempt what is due, one leased entry at a time (no other instance sends it
        meanwhile); return seconds to wait before the next look (0: look again now). Between
        looks the outbox waits for the state DB's notification of a new entry, from any instance."""
        for _ in range(ROUND):
            if self._stop.is_set():
                return 0.0
            row = self.db.lease_delivery(self.owner, self.config.delivery.lease_s)
            if row is None:
                break
            self.attempt(row)
        else:
            return 0.0
        nxt = self.db.next_delivery_at()
        cap = self.db.poll_cap_s
        return cap if nxt is None else max(0.05, min(cap, nxt - time.time()))

    def attempt(self, row: Delivery) -> bool:
        """Try one delivery; record success, or schedule the next try (or dead letter)."""
        payload = row.payload
        try:
            self._send(row, payload)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried
            error = f"{type(exc).__name__}: {exc}"[:500]
            attempts = row.attempts + 1
            age = time.time() - row.created_at
            dead = age >= self.config.delivery.dead_letter_after_s
            delay = backoff_delay(attempts, self.config.delivery.initial_backoff_s,
                                  self.config.delivery.max_backoff_s, self.rng)
            self.db.mark_delivery_failed(row.id, error, time.time() + delay, dead)
            metrics.DELIVERIES.labels(row.kind, "dead" if dead else "retry").inc()
            log.warning("delivery %s (%s to %s) failed, attempt %d: %s; %s", row.id, row.kind,
                        row.destination, attempts, error,
                        "dead letter" if dead else f"next try in {delay:.1f} s")
            return False
        self.db.mark_delivered(row.id)
        metrics.DELIVERIES.labels(row.kind, "delivered").inc()
        job = self.db.job(row.job_id)
        if job and job.series_completed_at:
            metrics.TIME_TO_RESULT.labels(job.model_name, row.kind).observe(
                time.time() - job.series_completed_at)
        log.info("delivery %s (%s to %s) accepted", row.id, row.kind, row.destination)
        return True

    def _send(self, row: Delivery, payload: dict[str, Any]) -> None:
        kind = row.kind
        if kind == "dicom":
            dest = self._destinations.get(row.destination)
            if dest is None:
                raise DeliveryError(f"destination {row.destination!r} is not configured")
            cstore_files(dest, self.config.ae_title, payload["files"],
                         self.config.delivery.timeout_s,
                         self.tls_context if dest.tls else None)
        elif kind == "hl7":
            self._send_hl7(row)
        elif kind == "webhook":
            self._send_webhook(row)
        else:
            raise DeliveryError(f"unknown delivery kind {kind!r}")

    def _notification(self, row: Delivery) -> tuple[dict[str, Any], Job]:
        job = self.db.job(row.job_id)
        if job is None:
            raise DeliveryError(f"job {row.job_id} is gone")
        study = self.db.study(job.study_uid) or {"study_uid": job.study_uid}
        return study, job

    def _send_hl7(self, row: Delivery) -> None:
        from datetime import datetime

        from service.hl7_notifier import build_oru_r01, send_mllp

        study, job = self._notification(row)
        cfg = self.config.hl7
        message = build_oru_r01(study, job.as_dict(), sending_facility=cfg.sending_facility,
                                receiving_application=cfg.receiving_application,
                                control_id=f"BEFUND{row.id}", now=datetime.now())
        send_mllp(cfg.host, cfg.port, message, self.config.delivery.timeout_s)

    def _send_webhook(self, row: Delivery) -> None:
        from service.webhook import post_json

        study, job = self._notification(row)
        result = job.result
        payload = {
            "event": "result",
            "study_uid": job.study_uid, "series_uid": job.series_uid,
            "accession": study.get("accession"),
            "model": job.model_name, "model_version": job.model_version, "run": job.run,
            "state": str(job.state), "present": result.get("present"),
            "certainty": result.get("certainty"), "reason": result.get("reason"),
            "finding": result.get("finding"), "priority": result.get("priority"),
        }
        post_json(row.destination, payload, self.config.delivery.timeout_s)
