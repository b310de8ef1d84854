"""The state DB: instances, series, jobs and the outbox, in SQLite (WAL) by default.

Every promise the node makes to a PACS rests on this file: an instance is acknowledged only
after its row is committed here; jobs carry a lease and an attempt count so a restart resumes
them; outbox rows survive crashes so a result is delivered once its destination is back.
All writes go through short transactions on one connection guarded by a lock; SQLite
serialises writers anyway, and the gateway does I/O, not pixels.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.spool import IndexedInstance, InstanceElsewhere

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_name TEXT, patient_id TEXT, accession TEXT, study_date TEXT,
    first_received_at REAL, updated_at REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, body_part TEXT, sop_class_uid TEXT,
    descriptions TEXT, image_type TEXT,
    instance_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    expected_count INTEGER,
    first_received_at REAL, last_received_at REAL,
    association_ended_at REAL,
    ready_requested INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'receiving',
    reason TEXT NOT NULL DEFAULT '',
    completed_at REAL,
    completed_by TEXT,
    restored INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    sop_class_uid TEXT, transfer_syntax TEXT, path TEXT NOT NULL, size INTEGER,
    instance_number INTEGER, number_of_frames INTEGER,
    calling_ae TEXT, peer_address TEXT, association_id TEXT, received_at REAL,
    purged_at REAL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_assoc ON instances(association_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, run INTEGER NOT NULL,
    instance_count INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL, lease_owner TEXT, next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    result TEXT,
    series_completed_at REAL,
    series_revision INTEGER,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
    UNIQUE (series_uid, model_name, model_version, run)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, delivered_at REAL,
    UNIQUE (job_id, kind, destination)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
"""

# The web side's records (service/users.py, service/audit_log.py, service/flag_reviews.py):
# accounts, who looked at or acknowledged what, and reviews of flags. Rows hold no patient data.
WEB_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    user TEXT NOT NULL, role TEXT NOT NULL,
    action TEXT NOT NULL,
    study_uid TEXT,
    detail TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log(at);
CREATE INDEX IF NOT EXISTS audit_log_study ON audit_log(study_uid);
CREATE TABLE IF NOT EXISTS flag_reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT, model_version TEXT, run INTEGER,
    user TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_reviews_study ON flag_reviews(study_uid);
"""

JOB_ACTIVE = ("queued", "running")
JOB_FINAL = ("done", "not_analysed", "failed")


class StateDB:
    """Thread-safe access to the state DB. Methods are named for the event they record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a killed process (kill -9) without an fsync
        # per commit (3.4 ms measured here, most of the ingest budget). After an OS crash or
        # power loss the last commits can be lost; the spool files are fsynced before the
        # acknowledgement and `Node.reconcile_spool` re-indexes them at start-up, and jobs and
        # deliveries are idempotent (deterministic result UIDs), so nothing acknowledged is lost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        self._db.executescript(WEB_SCHEMA)
        self._migrate()
        self._migrate_jobs()

    def _migrate(self) -> None:
        """Columns added after a DB was first created (CREATE TABLE IF NOT EXISTS keeps old tables)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(instances)")}
        if "purged_at" not in columns:
            self._db.execute("ALTER TABLE instances ADD COLUMN purged_at REAL")
        if "version" not in columns:
            self._db.execute("ALTER TABLE instances ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(series)")}
        if "restored" not in columns:
            self._db.execute("ALTER TABLE series ADD COLUMN restored INTEGER NOT NULL DEFAULT 0")
        if "revision" not in columns:
            # Before revisions, a series ran again when its count differed from its last job's,
            # or when `restored` was set: the same rule, expressed in revisions.
            with self.transaction() as db:
                db.execute("ALTER TABLE series ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE series SET revision=instance_count+restored")
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "series_revision" not in columns:
            with self.transaction() as db:
                db.execute("ALTER TABLE jobs ADD COLUMN series_revision INTEGER")
                db.execute("UPDATE jobs SET series_revision=instance_count")

    def _migrate_jobs(self) -> None:
        """Job columns added later: the stage an attempt is in (or failed in), and the analysis
        result of an attempt whose later stages failed (a retry does not run the model again)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "stage" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN stage TEXT NOT NULL DEFAULT ''")
        if "analysis" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN analysis TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def query_one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # --- receive -------------------------------------------------------------------------

    def indexed_instance(self, sop_instance_uid: str) -> IndexedInstance | None:
        """Where the current version of an instance lies (the spool's versioning asks)."""
        row = self.query_one(
            """SELECT study_uid, series_uid, path, version, purged_at FROM instances
               WHERE sop_instance_uid=?""", (sop_instance_uid,))
        if row is None:
            return None
        return IndexedInstance(row["study_uid"], row["series_uid"], Path(row["path"]),
                               int(row["version"]), row["purged_at"] is not None)

    def record_instance(self, inst: Any) -> bool:
        """Index a durably stored instance (a `spool.StoredInstance`). Returns False when
        nothing changed (a version the DB already holds).

        A new instance, or a new version of a known one (other content, or its file back after
        retention removed it), makes the series `receiving` again with a new revision: the
        series then completes again and starts a new, versioned run. The row points to the new
        version's file; the caller removes the old file after this commits. The same SOP
        Instance UID under another study or series raises InstanceElsewhere and changes nothing.
        """
        now = inst.received_at
        version = getattr(inst, "version", 1)
        with self.transaction() as db:
            known = db.execute(
                """SELECT study_uid, series_uid, version, size, purged_at FROM instances
                   WHERE sop_instance_uid=?""", (inst.sop_instance_uid,)).fetchone()
            if known and (known["study_uid"], known["series_uid"]) != (inst.study_uid, inst.series_uid):
                raise InstanceElsewhere(
                    f"SOP Instance UID {inst.sop_instance_uid} is indexed in study "
                    f"{known['study_uid']} series {known['series_uid']}; not moved to study "
                    f"{inst.study_uid} series {inst.series_uid}")
            if known and version <= known["version"] and known["purged_at"] is None:
                return False  # a duplicate: the DB holds this version already
            db.execute(
                """INSERT INTO studies(study_uid, patient_name, patient_id, accession, study_date,
                       first_received_at, updated_at) VALUES (?,?,?,?,?,?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET updated_at=excluded.updated_at""",
                (inst.study_uid, inst.patient_name, inst.patient_id, inst.accession,
                 inst.study_date, now, now))
            db.execute(
                """INSERT INTO series(series_uid, study_uid, modality, body_part, sop_class_uid,
                       descriptions, image_type, first_received_at, last_received_at)
                   VALUES (?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(series_uid) DO NOTHING""",
                (inst.series_uid, inst.study_uid, inst.modality, inst.body_part,
                 inst.sop_class_uid, json.dumps(list(inst.descriptions)),
                 json.dumps(list(inst.image_type)), now, now))
            db.execute(
                """INSERT OR REPLACE INTO instances(sop_instance_uid, series_uid, study_uid,
                       sop_class_uid, transfer_syntax, path, size, instance_number,
                       number_of_frames, calling_ae, peer_address, association_id, received_at,
                       version)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (inst.sop_instance_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid,
                 inst.transfer_syntax, str(inst.path), inst.size, inst.instance_number,
                 inst.number_of_frames, inst.calling_ae, inst.peer_address,
                 inst.association_id, now, version))
            counted = 0 if known else 1  # a new version replaces its instance: no new count
            grown = inst.size - ((known["size"] or 0) if known else 0)
            db.execute(
                """UPDATE series SET instance_count=instance_count+?, bytes=bytes+?,
                       revision=revision+1, last_received_at=?, association_ended_at=NULL,
                       state='receiving'
                   WHERE series_uid=?""",
                (counted, grown, now, inst.series_uid))
            return True

    def record_association_end(self, association_id: str, ended_at: float) -> int:
        """Note that the association that delivered these series has ended; returns series touched."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET association_ended_at=?
                   WHERE state='receiving' AND series_uid IN
                     (SELECT DISTINCT series_uid FROM instances WHERE association_id=?)""",
                (ended_at, association_id))
            return cur.rowcount

    def request_ready(self, series_uid: str, again: bool = False) -> bool:
        """The explicit trigger (`POST /studies/{uid}/run`) for one series: complete it now.
        `again`: run it even though nothing changed (a new revision); else only a series still
        receiving, or one that changed since its last run, runs."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET ready_requested=1, state='receiving',
                       revision=revision+?
                   WHERE series_uid=?""", (1 if again else 0, series_uid))
            return cur.rowcount == 1

    # --- completion and routing ---------------------------------------------------------

    def series_receiving(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM series WHERE state='receiving'")

    def series_paths(self, series_uid: str) -> list[str]:
        rows = self.query(
            "SELECT path FROM instances WHERE series_uid=? ORDER BY instance_number, sop_instance_uid",
            (series_uid,))
        return [r["path"] for r in rows]

    def purged_instances(self, series_uid: str) -> int:
        """How many of the series' instances have lost their file to retention."""
        row = self.query_one(
            "SELECT COUNT(*) AS n FROM instances WHERE series_uid=? AND purged_at IS NOT NULL",
            (series_uid,))
        return int(row["n"]) if row else 0

    def last_done_job(self, series_uid: str, model_name: str, before_run: int) -> dict[str, Any] | None:
        """The newest run of this series and model before `before_run` that analysed it."""
        return self.query_one(
            """SELECT * FROM jobs WHERE series_uid=? AND model_name=? AND run<? AND state='done'
               ORDER BY run DESC LIMIT 1""", (series_uid, model_name, before_run))

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM instances WHERE series_uid=? ORDER BY instance_number, sop_instance_uid",
            (series_uid,))

    def mark_series(self, series_uid: str, state: str, reason: str = "",
                    completed_by: str | None = None, at: float | None = None,
                    if_revision: int | None = None) -> bool:
        """Set a series' state; with `if_revision`, only if nothing arrived meanwhile (no new
        instance and no new version)."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET state=?, reason=?, ready_requested=0,
                       completed_by=COALESCE(?, completed_by), completed_at=COALESCE(?, completed_at)
                   WHERE series_uid=? AND (? IS NULL OR revision=?)""",
                (state, reason, completed_by, at, series_uid, if_revision, if_revision))
            return cur.rowcount == 1

    def create_job_if_new(self, series: dict[str, Any], model_name: str, model_version: str,
                          priority: int, completed_at: float) -> int | None:
        """One job per series x model version x run; a new run only when the series changed
        since the last run (new instances, new versions, files back after retention, or a run
        asked for again: each raises the series' revision)."""
        with self.transaction() as db:
            last = db.execute(
                """SELECT run, series_revision FROM jobs
                   WHERE series_uid=? AND model_name=? AND model_version=?
                   ORDER BY run DESC LIMIT 1""",
                (series["series_uid"], model_name, model_version)).fetchone()
            # `series` is the row read before routing, so every model routed to it sees one revision
            if last and last["series_revision"] == series["revision"]:
                return None
            run = (last["run"] + 1) if last else 1
            now = time.time()
            cur = db.execute(
                """INSERT INTO jobs(series_uid, study_uid, model_name, model_version, run,
                       instance_count, priority, series_completed_at, series_revision,
                       created_at, updated_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
                (series["series_uid"], series["study_uid"], model_name, model_version, run,
                 series["instance_count"], priority, completed_at, series["revision"], now, now))
            return int(cur.lastrowid)

    def runs_of(self, series_uid: str) -> list[dict[str, Any]]:
        """The newest run per model version of a series (what `POST .../run` weighs)."""
        return self.query(
            """SELECT j.* FROM jobs j
               WHERE j.series_uid=? AND j.run=(SELECT MAX(run) FROM jobs k WHERE
                   k.series_uid=j.series_uid AND k.model_name=j.model_name
                   AND k.model_version=j.model_version)""", (series_uid,))

    def previous_run(self, series_uid: str, model_name: str, model_version: str,
                     run: int) -> int | None:
        """The run before `run` of this series and model version (whose SR the new one supersedes)."""
        row = self.query_one(
            """SELECT MAX(run) AS run FROM jobs
               WHERE series_uid=? AND model_name=? AND model_version=? AND run<?""",
            (series_uid, model_name, model_version, run))
        return row["run"] if row and row["run"] is not None else None

    # --- jobs ------------------------------------------------------------------------------

    def requeue_orphans(self, owner: str) -> int:
        """At start-up: jobs another (dead) process was running go back to the queue."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL
                   WHERE state='running' AND (lease_owner IS NULL OR lease_owner != ?)""",
                (owner,))
            return cur.rowcount

    def lease_job(self, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the next due job (highest priority first), or an expired lease."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                """SELECT * FROM jobs
                   WHERE (state='queued' AND next_attempt_at<=?)
                      OR (state='running' AND lease_until<?)
                   ORDER BY priority DESC, id LIMIT 1""", (now, now)).fetchone()
            if row is None:
                return None
            db.execute(
                """UPDATE jobs SET state='running', lease_owner=?, lease_until=?,
                       attempts=attempts+1, updated_at=? WHERE id=?""",
                (owner, now + lease_s, now, row["id"]))
            job = dict(row)
            job["attempts"] += 1
            return job

    def renew_job_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease of a job this owner still runs (a long analysis is not re-leased)."""
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET lease_until=? WHERE id=? AND lease_owner=? AND state='running'""",
                (now + lease_s, job_id, owner))
            return cur.rowcount == 1

    def record_job_stage(self, job_id: int, stage: str) -> None:
        """The stage the job's attempt enters; kept if the attempt or the node dies in it."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET stage=?, updated_at=? WHERE id=?", (stage, time.time(), job_id))

    def keep_job_analysis(self, job_id: int, analysis: dict[str, Any]) -> None:
        """The model's result for this job, kept until the job finishes (retries reuse it)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET analysis=? WHERE id=?", (json.dumps(analysis), job_id))

    def retry_job_later(self, job_id: int, error: str, delay_s: float) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL,
                       next_attempt_at=?, last_error=?, updated_at=? WHERE id=?""",
                (now + delay_s, error, now, job_id))

    def finish_job(self, job_id: int, state: str, result: dict[str, Any], error: str,
                   deliveries: list[tuple[str, str, dict[str, Any]]], stage: str = "") -> None:
        """Record a job's outcome and queue its deliveries in one transaction; `stage` names
        the stage a failed job failed in."""
        assert state in JOB_FINAL
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """UPDATE jobs SET state=?, result=?, last_error=?, lease_until=NULL,
                       updated_at=?, finished_at=?, stage=?, analysis=NULL WHERE id=?""",
                (state, json.dumps(result), error, now, now, stage, job_id))
            for kind, destination, payload in deliveries:
                db.execute(
                    """INSERT INTO outbox(job_id, kind, destination, payload, created_at,
                           next_attempt_at) VALUES (?,?,?,?,?,?)
                       ON CONFLICT(job_id, kind, destination) DO NOTHING""",
                    (job_id, kind, destination, json.dumps(payload), now, now))

    def job(self, job_id: int) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def job_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # --- outbox ----------------------------------------------------------------------------

    def due_deliveries(self, now: float, limit: int = 16) -> list[dict[str, Any]]:
        return self.query(
            """SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=?
               ORDER BY next_attempt_at, id LIMIT ?""", (now, limit))

    def next_delivery_at(self) -> float | None:
        row = self.query_one("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state='pending'")
        return row["t"] if row else None

    def mark_delivered(self, delivery_id: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE outbox SET state='delivered', delivered_at=?, attempts=attempts+1 WHERE id=?",
                (time.time(), delivery_id))

    def mark_delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float,
                             dead: bool) -> None:
        with self.transaction() as db:
            db.execute(
                """UPDATE outbox SET state=?, attempts=attempts+1, last_error=?,
                       next_attempt_at=? WHERE id=?""",
                ("dead" if dead else "pending", error, next_attempt_at, delivery_id))

    def resend(self, delivery_id: int) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE outbox SET state='pending', next_attempt_at=0, created_at=?
                   WHERE id=? AND state IN ('dead','delivered','pending')""",
                (time.time(), delivery_id))
            return cur.rowcount == 1

    def discard_delivery(self, delivery_id: int) -> bool:
        """An admin gives up on a dead (or still pending) delivery: it is never sent."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE outbox SET state='discarded' WHERE id=? AND state IN ('dead','pending')",
                (delivery_id,))
            return cur.rowcount == 1

    def deliveries_in_state(self, state: str, limit: int = 500) -> list[dict[str, Any]]:
        """Outbox rows in one state with their study (the dead-letter view), oldest first."""
        return self.query(
            """SELECT o.id, o.job_id, o.kind, o.destination, o.state, o.attempts, o.last_error,
                      o.created_at, o.next_attempt_at, j.study_uid, j.model_name, j.run,
                      s.accession
               FROM outbox o JOIN jobs j ON j.id=o.job_id
               LEFT JOIN studies s ON s.study_uid=j.study_uid
               WHERE o.state=? ORDER BY o.id LIMIT ?""", (state, limit))

    # --- retention -----------------------------------------------------------------------

    def series_due_for_purge(self, done_before: float) -> list[str]:
        """Series with unpurged instances whose results were all delivered before `done_before`.

        Not due: a series still receiving, one with a queued or running job, one with an
        outbox row that is not delivered (pending or dead), or a routed series without jobs.
        A series that no model takes is due `done_before` after it was completed.
        """
        return [r["series_uid"] for r in self.query(
            """SELECT s.series_uid, s.completed_at FROM series s
               WHERE s.state IN ('routed', 'no_model', 'ignored')
                 AND EXISTS (SELECT 1 FROM instances i
                             WHERE i.series_uid=s.series_uid AND i.purged_at IS NULL)
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid=s.series_uid
                                 AND j.state IN ('queued', 'running'))
                 AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON j.id=o.job_id
                                 WHERE j.series_uid=s.series_uid
                                   AND o.state NOT IN ('delivered', 'discarded'))
                 AND (s.state != 'routed'
                      OR EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid=s.series_uid))
            """, ())
            if self._done_at(r["series_uid"], r["completed_at"]) < done_before]

    def _done_at(self, series_uid: str, completed_at: float | None) -> float:
        """When the series' last job finished or its last result was delivered."""
        row = self.query_one(
            """SELECT MAX(t) AS t FROM (
                   SELECT finished_at AS t FROM jobs WHERE series_uid=?
                   UNION ALL
                   SELECT o.delivered_at FROM outbox o JOIN jobs j ON j.id=o.job_id
                   WHERE j.series_uid=?)""", (series_uid, series_uid))
        return (row and row["t"]) or completed_at or 0.0

    def mark_series_purged(self, series_uid: str, at: float) -> list[str]:
        """Mark the series' instances purged (unless it started receiving again); return their paths."""
        with self.transaction() as db:
            state = db.execute("SELECT state FROM series WHERE series_uid=?",
                               (series_uid,)).fetchone()
            if state is None or state["state"] == "receiving":
                return []
            rows = db.execute(
                "SELECT path FROM instances WHERE series_uid=? AND purged_at IS NULL",
                (series_uid,)).fetchall()
            db.execute("UPDATE instances SET purged_at=? WHERE series_uid=? AND purged_at IS NULL",
                       (at, series_uid))
            return [r["path"] for r in rows]

    # --- reading for the API and the worklist ---------------------------------------------

    def studies(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM studies ORDER BY first_received_at DESC")

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM studies WHERE study_uid=?", (study_uid,))

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM series WHERE study_uid=? ORDER BY first_received_at",
                          (study_uid,))

    def jobs_of(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id", (study_uid,))

    def deliveries_of(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query(
            """SELECT o.* FROM outbox o JOIN jobs j ON j.id=o.job_id
               WHERE j.study_uid=? ORDER BY o.id""", (study_uid,))

    def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM outbox WHERE id=?", (delivery_id,))
