"""The node: wires receive -> state DB -> completion -> jobs -> outbox, and holds them for the API.

The gateway service builds one Node per process. Receiving starts at once; the job runner
starts when the model service can be called. A restart reconciles the spool with the state
DB, so an instance that was written but not yet indexed when the node died is not lost.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from pipelines.model_card import ModelCard
from pipelines.model_lineup import model_lineup
from service import metrics
from service.completion_watcher import CompletionWatcher, RunAnswer
from service.config import Config
from service.dicom_listener import DicomListener
from service.job_runner import Analyse, JobRunner
from service.node_checks import Check, failing, node_checks, ready
from service.outbox import Outbox
from service.private_files import tighten_var_dir
from service.receiver_pool import ReceiverPool
from service.retention import RetentionCleaner
from service.spool import Spool, SpoolError, StoredInstance, parse_instance_name
from service.state_db import StateDB

log = logging.getLogger("befund.node")

_current: Node | None = None


def current_node() -> Node:
    if _current is None:
        raise RuntimeError("the node is not started")
    return _current


def load_or_create_token(config: Config) -> str:
    """The HTTP API token: from config, else generated once and kept in var/token (0600)."""
    token = config.stored_token()
    if token:
        return token
    path = config.token_path
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Node:
    def __init__(self, config: Config, cards: list[ModelCard] | None = None):
        global _current
        self.config = config
        self.owner = config.instance  # this instance's name in leases and associations
        config.var_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        tighten_var_dir(config.var_path)
        self.token = load_or_create_token(config)
        self.card_errors: dict[str, str] = {}
        self.retired: dict[str, str] = {}  # disabled or superseded cards: not run, by design
        if cards is None:
            lineup = model_lineup(config.models_dir)  # two active versions of a model: refused
            cards, self.card_errors, self.retired = list(lineup.cards), lineup.errors, lineup.retired
            for folder, error in self.card_errors.items():
                log.error("model %s not loaded: %s", folder, error)
            for folder, why in self.retired.items():
                log.info("model %s not run: %s", folder, why)
            from service.site_thresholds import unknown_models

            for model in unknown_models(config.site_thresholds, lineup.known_keys()):
                log.warning("site_thresholds: %s names no model card; its thresholds apply nowhere", model)
        self.cards = cards
        self.db = StateDB(config.database_url or config.db_path, instance_id=self.owner,
                          pool_size=config.database_pool_size, timeout_s=config.database_timeout_s)
        log.info("state DB: %s (schema version %d), instance %s", self.db.describe(),
                 self.db.schema_version, self.owner)
        self.spool = Spool(config.spool_path, config.min_free_bytes,
                           max_instance_bytes=config.max_instance_bytes,
                           instance=self.owner if self.db.shared else "")
        self.outbox = Outbox(self.db, config, tls_context=self._client_tls(), owner=self.owner)
        self.completion = CompletionWatcher(self.db, self.cards, config.settle_s, config.quiet_s,
                                            on_jobs=self._jobs_created)
        self.receives = config.role in ("all", "receiver")  # DICOM in: listener and spool
        self.works = config.role in ("all", "worker")  # completion, jobs, outbox, retention
        processes = config.receiver_processes if self.receives else 1
        self.listener = DicomListener(config, self.spool, self._on_instance,
                                      self._on_association_end, indexed=self.db.indexed_instance,
                                      reuse_port=processes > 1)
        self.receivers = ReceiverPool(self.owner, processes if self.receives else 1)
        self.retention = RetentionCleaner(self.db, config.spool_path, config.retention_hours)
        # any instance's new job, new delivery or ended association wakes the thread that waits for it
        self.db.subscribe("series", self.completion.wake.set)
        self.db.subscribe("outbox", self.outbox.wake.set)
        self.db.subscribe("jobs", self._jobs_created)
        self.runner: JobRunner | None = None
        self._metrics_stop = threading.Event()
        self._last_failing: str | None = None
        _current = self

    # --- lifecycle -------------------------------------------------------------------------

    def start_receiving(self) -> None:
        """Start what this instance's role runs (all, receiver or worker), except the jobs."""
        if self.receives:
            self.spool.sweep_tmp()
            # associations a process that is gone held (SQLite: any; PostgreSQL: this instance's)
            self.db.end_associations_left_open(self.owner if self.db.shared else None, time.time())
            self.reconcile_spool()
            self.listener.start()
            self.receivers.start()
        if self.works:
            self.completion.start()
            self.outbox.start()
            self.retention.start()
        threading.Thread(target=self._refresh_gauges, name="gauges", daemon=True).start()
        if self.receives:
            log.info("DICOM listener %s on port %d (%d process(es)); %d model(s): %s",
                     self.config.ae_title, self.listener.port, 1 + self.receivers.size, len(self.cards),
                     ", ".join(c.key + (" (shadow)" if c.mode == "shadow" else "") for c in self.cards))
        log.info("role %s: %s", self.config.role, "receive" if not self.works else
                 "work" if not self.receives else "receive and work")

    def start_jobs(self, analyse: Analyse) -> None:
        if not self.works:
            return
        self.runner = JobRunner(self.db, {c.key: c for c in self.cards}, analyse, self.config,
                                self.owner, on_queued=self.outbox.wake.set)
        self.runner.start()

    def stop(self) -> None:
        self._metrics_stop.set()
        self.receivers.stop()
        self.listener.stop()
        self.completion.stop()
        if self.runner:
            self.runner.stop()
        self.outbox.stop()
        self.retention.stop()
        self.db.close()

    # --- events ------------------------------------------------------------------------------

    def _on_instance(self, inst: StoredInstance) -> None:
        new = self.db.record_instance(inst)
        if new:
            metrics.INSTANCES_RECEIVED.labels(inst.modality or "unknown").inc()
            metrics.BYTES_RECEIVED.inc(inst.size)
        else:
            metrics.INSTANCES_DUPLICATE.labels(inst.modality or "unknown").inc()

    def _on_association_end(self, association_id: str, calling_ae: str) -> None:
        metrics.ASSOCIATIONS.labels("accepted").inc()
        self.db.record_association_end(association_id, time.time())
        self.completion.wake.set()

    def _jobs_created(self) -> None:
        if self.runner:
            self.runner.wake.set()

    def request_run(self, study_uid: str, force: bool = False) -> list[RunAnswer] | None:
        """`POST /studies/{uid}/run`: what runs and why the rest does not (None: unknown study)."""
        return self.completion.request_run(study_uid, force)

    def resend(self, delivery_id: int) -> bool:
        ok = self.db.resend(delivery_id)
        self.outbox.wake.set()
        return ok

    # --- health -------------------------------------------------------------------------------

    def checks(self) -> list[Check]:
        """Each part's state (service/node_checks.py); a change of what fails is logged once."""
        checks = node_checks(self)
        now_failing = failing(checks)
        if now_failing != self._last_failing:
            if now_failing:  # while starting (no job runner yet) this is expected: info only
                log.log(logging.INFO if self.runner is None else logging.WARNING,
                        "node not ready: %s", now_failing)
            elif self._last_failing:
                log.info("node ready again")
            self._last_failing = now_failing
        for c in checks:
            metrics.NODE_CHECK.labels(c.name).set(1 if c.ok else 0)
        metrics.NODE_READY.set(1 if ready(checks) else 0)
        return checks

    # --- recovery ------------------------------------------------------------------------------

    def reconcile_spool(self) -> int:
        """Bring the state DB and the spool together after a crash; returns instances indexed.

        Every file under a final name is complete (the spool renames only fsynced files), so
        for each file that no row points to:
        - no row for its SOP Instance UID: the node died between rename and commit; index it;
        - a row of the same series at a later version: the node died after committing the new
          version and before removing this old one; remove it now;
        - a row of the same series at an earlier version: a new version written but not yet
          indexed; index it like the listener would (same content: dropped; other: the new
          version, and the old file goes after the commit);
        - a row of another study or series: never moved; the file is left where it is, logged.
        """
        rows = {r["sop_instance_uid"]: r for r in self.db.query(
            "SELECT sop_instance_uid, study_uid, series_uid, path, version FROM instances")}
        known = {r["path"] for r in rows.values()}
        added = 0
        for path in self.spool.iter_instances():
            if str(path) in known:
                continue
            sop, version = parse_instance_name(path.name) or ("", 0)
            row = rows.get(sop)
            if row is not None and (row["study_uid"], row["series_uid"]) != (
                    path.parent.parent.name, path.parent.name):
                log.warning("spool file of instance %s in study %s series %s is not indexed: the "
                            "instance belongs to study %s series %s; left in place", sop,
                            path.parent.parent.name, path.parent.name, row["study_uid"],
                            row["series_uid"])
                continue
            if row is not None and version < row["version"]:
                self.spool.remove(path)
                log.info("removed version %d of instance %s, replaced by version %d", version, sop,
                         row["version"])
                continue
            if self._recover(path):
                added += 1
        if added:
            self.db.record_association_end("recovered", time.time())
            log.info("recovered %d spooled instance(s) that were not yet indexed", added)
        return added

    def _recover(self, path: Path) -> bool:
        """Index one spool file no row points to, as the listener would have; True if indexed."""
        try:
            inst = self.spool.store(path, association_id="recovered", move=True,
                                    indexed=self.db.indexed_instance)
        except Exception as exc:  # noqa: BLE001 - a broken leftover must not stop start-up
            log.warning("spool file %s cannot be indexed (%s); left in place", path.name, exc)
            return False
        if inst.unchanged:
            self.spool.remove(path)  # the same data set as the indexed version: a redundant copy
            return False
        try:
            self.db.record_instance(inst)
        except SpoolError as exc:
            log.warning("spool file %s not indexed (%s); left in place", path.name, exc)
            return False
        if inst.replaces is not None:
            self.spool.remove(inst.replaces)
        return True

    def _client_tls(self):  # noqa: ANN202 - ssl.SSLContext | None
        tls = self.config.tls
        if not (tls.enabled and tls.ca):
            return None
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
        ctx.check_hostname = False
        if tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
        return ctx

    def _refresh_gauges(self) -> None:
        while not self._metrics_stop.wait(2.0):
            try:
                counts = self.db.job_counts()
                for state in ("queued", "running", "done", "not_analysed", "failed"):
                    metrics.JOBS.labels(state).set(counts.get(state, 0))
                by_state = self.db.outbox_counts()
                for state in ("pending", "delivered", "dead"):
                    metrics.OUTBOX_PENDING.labels(state).set(by_state.get(state, 0))
                metrics.SPOOL_FREE_BYTES.set(self.spool.free_bytes())
                self.checks()
            except Exception:  # noqa: BLE001 - metrics must never take the node down
                log.debug("gauge refresh failed", exc_info=True)


def models_root() -> Path:
    return Path(__file__).resolve().parent.parent / "models"
