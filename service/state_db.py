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
    restored INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    sop_class_uid TEXT, transfer_syntax TEXT, path TEXT NOT NULL, size INTEGER,
    instance_number INTEGER, number_of_frames INTEGER,
    calling_ae TEXT, peer_address TEXT, association_id TEXT, received_at REAL,
    purged_at REAL
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

# A slide series holds LABEL, OVERVIEW and THUMBNAIL images beside its pyramid levels, in
# whatever order the sender picks (dcmsend: directory order). The series' image type, which
# routing reads, is that of its first instance unless that one is such an associated image
# and a later one is not: a label sent first must not stand for the whole slide.
_ASSOCIATED = " OR ".join(f"{{t}}.image_type LIKE '%\"{kind}\"%'"
                          for kind in ("LABEL", "OVERVIEW", "THUMBNAIL"))
_IMAGE_TYPE_UPDATE = (f"image_type=excluded.image_type WHERE ({_ASSOCIATED.format(t='series')}) "
                      f"AND NOT ({_ASSOCIATED.format(t='excluded')})")

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
        self._migrate()

    def _migrate(self) -> None:
        """Columns added after a DB was first created (CREATE TABLE IF NOT EXISTS keeps old tables)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(instances)")}
        if "purged_at" not in columns:
            self._db.execute("ALTER TABLE instances ADD COLUMN purged_at REAL")
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(series)")}
        if "restored" not in columns:
            self._db.execute("ALTER TABLE series ADD COLUMN restored INTEGER NOT NULL DEFAULT 0")

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

    def record_instance(self, inst: Any) -> bool:
        """Index a durably stored instance (a `spool.StoredInstance`). Returns False for a duplicate.

        A duplicate SOP Instance UID replaces the file (same path) but does not count twice,
        so re-sent instances start no new run, unless retention had removed its file: then
        the series is whole again and runs again. A new instance in a series that already ran
        puts the series back to `receiving`: late instances start a new, versioned run.
        """
        now = inst.received_at
        with self.transaction() as db:
            known = db.execute("SELECT series_uid, purged_at FROM instances WHERE sop_instance_uid=?",
                               (inst.sop_instance_uid,)).fetchone()
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
                   ON CONFLICT(series_uid) DO UPDATE SET """ + _IMAGE_TYPE_UPDATE,
                (inst.series_uid, inst.study_uid, inst.modality, inst.body_part,
                 inst.sop_class_uid, json.dumps(list(inst.descriptions)),
                 json.dumps(list(inst.image_type)), now, now))
            db.execute(
                """INSERT OR REPLACE INTO instances(sop_instance_uid, series_uid, study_uid,
                       sop_class_uid, transfer_syntax, path, size, instance_number,
                       number_of_frames, calling_ae, peer_address, association_id, received_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (inst.sop_instance_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid,
                 inst.transfer_syntax, str(inst.path), inst.size, inst.instance_number,
                 inst.number_of_frames, inst.calling_ae, inst.peer_address,
                 inst.association_id, now))
            if known and known["purged_at"] is not None:
                # its file had gone with retention and is back: the series can run again
                db.execute(
                    """UPDATE series SET last_received_at=?, association_ended_at=NULL,
                           state='receiving', restored=1 WHERE series_uid=?""",
                    (now, inst.series_uid))
                return True
            if known:
                db.execute("UPDATE series SET last_received_at=? WHERE series_uid=?",
                           (now, inst.series_uid))
                return False
            db.execute(
                """UPDATE series SET instance_count=instance_count+1, bytes=bytes+?,
                       last_received_at=?, association_ended_at=NULL,
                       state='receiving'
                   WHERE series_uid=?""",
                (inst.size, now, inst.series_uid))
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

    def request_run(self, study_uid: str) -> int:
        """The explicit trigger (`POST /studies/{uid}/run`): its series are complete now.

        Series that already ran are forced through routing again, which starts a new run only
        when their instances changed, or a fresh run when `force` semantics are wanted later.
        """
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET ready_requested=1,
                       state=CASE WHEN state IN ('routed','no_model','ignored') THEN 'receiving'
                                  ELSE state END
                   WHERE study_uid=?""", (study_uid,))
            return cur.rowcount

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
                    if_count: int | None = None) -> bool:
        """Set a series' state; with `if_count`, only if no instance arrived meanwhile."""
        with self.transaction() as db:
            cur = db.execute(
                """UPDATE series SET state=?, reason=?, ready_requested=0,
                       completed_by=COALESCE(?, completed_by), completed_at=COALESCE(?, completed_at)
                   WHERE series_uid=? AND (? IS NULL OR instance_count=?)""",
                (state, reason, completed_by, at, series_uid, if_count, if_count))
            return cur.rowcount == 1

    def create_job_if_new(self, series: dict[str, Any], model_name: str, model_version: str,
                          priority: int, completed_at: float) -> int | None:
        """One job per series x model version x run; a new run only when instances changed, or
        when files retention had removed are back (the last run could not analyse them)."""
        with self.transaction() as db:
            last = db.execute(
                """SELECT run, instance_count, state FROM jobs
                   WHERE series_uid=? AND model_name=? AND model_version=?
                   ORDER BY run DESC LIMIT 1""",
                (series["series_uid"], model_name, model_version)).fetchone()
            # `series` is the row read before routing, so every model routed to it sees the flag
            if last and last["instance_count"] == series["instance_count"] and not series.get("restored"):
                return None
            db.execute("UPDATE series SET restored=0 WHERE series_uid=?", (series["series_uid"],))
            run = (last["run"] + 1) if last else 1
            now = time.time()
            cur = db.execute(
                """INSERT INTO jobs(series_uid, study_uid, model_name, model_version, run,
                       instance_count, priority, series_completed_at, created_at, updated_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?)""",
                (series["series_uid"], series["study_uid"], model_name, model_version, run,
                 series["instance_count"], priority, completed_at, now, now))
            return int(cur.lastrowid)

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

    def retry_job_later(self, job_id: int, error: str, delay_s: float) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL,
                       next_attempt_at=?, last_error=?, updated_at=? WHERE id=?""",
                (now + delay_s, error, now, job_id))

    def finish_job(self, job_id: int, state: str, result: dict[str, Any], error: str,
                   deliveries: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Record a job's outcome and queue its deliveries in one transaction."""
        assert state in JOB_FINAL
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """UPDATE jobs SET state=?, result=?, last_error=?, lease_until=NULL,
                       updated_at=?, finished_at=? WHERE id=?""",
                (state, json.dumps(result), error, now, now, job_id))
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
                                 WHERE j.series_uid=s.series_uid AND o.state != 'delivered')
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
