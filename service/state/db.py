"""The state DB: instances, series, jobs and the outbox, in SQLite (WAL) or PostgreSQL.

Every promise the node makes to a PACS rests on it: an instance is acknowledged only after its
row is committed here; jobs carry a lease and an attempt count so a restart resumes them;
outbox rows survive crashes so a result is delivered once its destination is back. Methods
are named for the event they record, each one short transaction.

Several instances may share one PostgreSQL state DB (service/state/postgres.py). What keeps
them apart lives here, in the same SQL for both backends:
- jobs and deliveries are leased (`lease_owner`, `lease_until`; taken with `skip_locked`), so
  exactly one instance works on each, and another takes it over when a lease expires;
- a series completes and gets its jobs in one transaction that holds the series' row
  (`complete_series`), so two instances never route the same series twice (the unique
  (series, model, version, run) of `jobs` is the backstop);
- associations are kept with the instance that holds them: a series completes on its
  associations' end only when none of them is open at any instance;
- retention re-checks, holding the series' row, that nothing still needs its files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.spool import IndexedInstance, InstanceElsewhere
from service.state.backend import Tx
from service.state.rows import JOB_FINAL, Delivery, Job, Series
from service.state.schema import migrate

# A slide series holds LABEL, OVERVIEW and THUMBNAIL images beside its pyramid levels, in
# whatever order the sender picks (dcmsend: directory order). The series' image type, which
# routing reads, is that of its first instance unless that one is such an associated image
# and a later one is not: a label sent first must not stand for the whole slide.
_ASSOCIATED = " OR ".join(f"{{t}}.image_type LIKE '%\"{kind}\"%'"
                          for kind in ("LABEL", "OVERVIEW", "THUMBNAIL"))
_IMAGE_TYPE_UPDATE = (f"image_type=excluded.image_type WHERE ({_ASSOCIATED.format(t='series')}) "
                      f"AND NOT ({_ASSOCIATED.format(t='excluded')})")


@dataclass(frozen=True)
class PlannedJob:
    """A job that routing decided a completed series gets (`complete_series` creates it)."""

    model_name: str
    model_version: str
    priority: int
    mode: str = "active"  # the card's mode: "shadow" jobs run, and are never delivered


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_backend(target: str | Path, *, pool_size: int = 16, timeout_s: float = 5.0) -> Any:
    """SQLite for a path, PostgreSQL for a postgresql:// URL."""
    if is_postgres_url(target):
        from service.state.postgres import PostgresBackend

        return PostgresBackend(str(target), pool_size=pool_size, timeout_s=timeout_s)
    from service.state.sqlite import SqliteBackend

    return SqliteBackend(target)


class StateDB:
    """Thread-safe access to the state DB. Methods are named for the event they record.

    `target`: an SQLite file, or a postgresql:// URL. `instance_id` names this instance in the
    associations it holds (leases are taken in the name the caller passes)."""

    def __init__(self, target: str | Path, *, instance_id: str = "", pool_size: int = 16,
                 timeout_s: float = 5.0):
        self.backend = open_backend(target, pool_size=pool_size, timeout_s=timeout_s)
        self.instance_id = instance_id or "befund"
        self.errors = self.backend.errors
        self._registered: set[str] = set()  # associations whose row this instance has written
        try:
            self.schema_version = migrate(self.backend)
        except BaseException:
            self.backend.close()
            raise

    @property
    def poll_cap_s(self) -> float:
        """The longest a waiting thread sleeps without a notification or a known due time."""
        return self.backend.poll_cap_s

    @property
    def shared(self) -> bool:
        """True when other instances may use the same state DB (PostgreSQL)."""
        return self.backend.shared

    def describe(self) -> str:
        return self.backend.describe()

    def close(self) -> None:
        self.backend.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.backend.transaction() as tx:
            yield tx

    def query(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        return self.backend.query(sql, args)

    def query_one(self, sql: str, args: tuple | list = ()) -> dict[str, Any] | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def ping(self, timeout_s: float = 2.0) -> None:
        """Raise (one of `errors`) unless the state DB answers within about `timeout_s`."""
        self.backend.ping(timeout_s)

    def subscribe(self, channel: str, callback: Callable[[], None]) -> None:
        """Call `callback` when a transaction of any instance announces `channel` ('jobs',
        'outbox', 'series'); it runs in the committing thread or the listening thread: keep it
        short (set an Event)."""
        self.backend.notifications.subscribe(channel, callback)

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
        With PostgreSQL the commit is the durability point of the acknowledgement.
        """
        now = inst.received_at
        version = getattr(inst, "version", 1)
        association = inst.association_id
        with self.transaction() as tx:
            self.backend.lock(tx, inst.sop_instance_uid)  # the same UID at two instances at once
            known = tx.execute(
                """SELECT study_uid, series_uid, version, size, purged_at FROM instances
                   WHERE sop_instance_uid=?""", (inst.sop_instance_uid,)).fetchone()
            if known and (known["study_uid"], known["series_uid"]) != (inst.study_uid, inst.series_uid):
                raise InstanceElsewhere(
                    f"SOP Instance UID {inst.sop_instance_uid} is indexed in study "
                    f"{known['study_uid']} series {known['series_uid']}; not moved to study "
                    f"{inst.study_uid} series {inst.series_uid}")
            if known and version <= known["version"] and known["purged_at"] is None:
                return False  # a duplicate: the DB holds this version already
            if association and association not in self._registered:
                tx.execute(
                    """INSERT INTO associations(association_id, instance_id, opened_at)
                       VALUES (?,?,?) ON CONFLICT(association_id) DO NOTHING""",
                    (association, self.instance_id, now))
            tx.execute(
                """INSERT INTO studies(study_uid, patient_name, patient_id, accession, study_date,
                       first_received_at, updated_at) VALUES (?,?,?,?,?,?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET updated_at=excluded.updated_at""",
                (inst.study_uid, inst.patient_name, inst.patient_id, inst.accession,
                 inst.study_date, now, now))
            tx.execute(
                """INSERT INTO series(series_uid, study_uid, modality, body_part, sop_class_uid,
                       descriptions, image_type, first_received_at, last_received_at)
                   VALUES (?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(series_uid) DO UPDATE SET """ + _IMAGE_TYPE_UPDATE,
                (inst.series_uid, inst.study_uid, inst.modality, inst.body_part,
                 inst.sop_class_uid, json.dumps(list(inst.descriptions)),
                 json.dumps(list(inst.image_type)), now, now))
            tx.execute(
                """INSERT INTO instances(sop_instance_uid, series_uid, study_uid,
                       sop_class_uid, transfer_syntax, path, size, instance_number,
                       number_of_frames, calling_ae, peer_address, association_id, received_at,
                       version)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(sop_instance_uid) DO UPDATE SET
                       sop_class_uid=excluded.sop_class_uid,
                       transfer_syntax=excluded.transfer_syntax, path=excluded.path,
                       size=excluded.size, instance_number=excluded.instance_number,
                       number_of_frames=excluded.number_of_frames,
                       calling_ae=excluded.calling_ae, peer_address=excluded.peer_address,
                       association_id=excluded.association_id,
                       received_at=excluded.received_at, version=excluded.version,
                       purged_at=NULL""",
                (inst.sop_instance_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid,
                 inst.transfer_syntax, str(inst.path), inst.size, inst.instance_number,
                 inst.number_of_frames, inst.calling_ae, inst.peer_address,
                 association, now, version))
            counted = 0 if known else 1  # a new version replaces its instance: no new count
            grown = inst.size - ((known["size"] or 0) if known else 0)
            # last: the series' row lock is what an association's end waits for (see there)
            tx.execute(
                """UPDATE series SET instance_count=instance_count+?, bytes=bytes+?,
                       revision=revision+1, last_received_at=?, association_ended_at=NULL,
                       state='receiving'
                   WHERE series_uid=?""",
                (counted, grown, now, inst.series_uid))
        if association:
            self._registered.add(association)
        return True

    def record_association_end(self, association_id: str, ended_at: float) -> int:
        """Note that an association has ended; returns the series whose every association has
        now ended (their settle time starts now).

        A series that is still being received over another association, at this instance or
        another one, waits for that one's end: each series' row is locked before the open
        associations are counted, and an instance's row is written before its series' row,
        so an instance committed meanwhile is seen, or resets the end after this commits."""
        self._registered.discard(association_id)
        touched = 0
        with self.transaction() as tx:
            tx.execute("UPDATE associations SET ended_at=? WHERE association_id=? AND ended_at IS NULL",
                       (ended_at, association_id))
            uids = [r["series_uid"] for r in tx.execute(
                "SELECT DISTINCT series_uid FROM instances WHERE association_id=?",
                (association_id,)).fetchall()]
            for uid in sorted(uids):  # one order at every instance: no deadlock
                row = tx.execute(f"SELECT state FROM series WHERE series_uid=?{self.backend.for_update}",
                                 (uid,)).fetchone()
                if row is None or row["state"] != "receiving":
                    continue
                still_open = tx.execute(
                    """SELECT 1 FROM instances i JOIN associations a ON a.association_id=i.association_id
                       WHERE i.series_uid=? AND a.ended_at IS NULL LIMIT 1""", (uid,)).fetchone()
                if still_open:
                    continue
                tx.execute("UPDATE series SET association_ended_at=? WHERE series_uid=?", (ended_at, uid))
                touched += 1
            if touched:
                tx.notify("series")
        return touched

    def end_associations_left_open(self, instance_id: str | None, at: float) -> int:
        """At start-up: associations that a process which is gone held count as ended (without
        completing their series: an association cut short is no sign of a complete series).
        `instance_id`: only that instance's (PostgreSQL: others may be alive); None: all."""
        with self.transaction() as tx:
            if instance_id is None:
                cur = tx.execute("UPDATE associations SET ended_at=? WHERE ended_at IS NULL", (at,))
            else:
                cur = tx.execute("""UPDATE associations SET ended_at=?
                                    WHERE ended_at IS NULL AND instance_id=?""", (at, instance_id))
            return cur.rowcount

    def request_ready(self, series_uid: str, again: bool = False) -> bool:
        """The explicit trigger (`POST /studies/{uid}/run`) for one series: complete it now.
        `again`: run it even though nothing changed (a new revision); else only a series still
        receiving, or one that changed since its last run, runs."""
        with self.transaction() as tx:
            cur = tx.execute(
                """UPDATE series SET ready_requested=1, state='receiving',
                       revision=revision+?
                   WHERE series_uid=?""", (1 if again else 0, series_uid))
            tx.notify("series")
            return cur.rowcount == 1

    # --- completion and routing ---------------------------------------------------------

    def series_receiving(self) -> list[Series]:
        return [Series.from_row(r) for r in self.query("SELECT * FROM series WHERE state='receiving'")]

    def series(self, series_uid: str) -> Series | None:
        row = self.query_one("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return Series.from_row(row) if row else None

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

    def last_done_job(self, series_uid: str, model_name: str, before_run: int) -> Job | None:
        """The newest run of this series and model before `before_run` that analysed it."""
        row = self.query_one(
            """SELECT * FROM jobs WHERE series_uid=? AND model_name=? AND run<? AND state='done'
               ORDER BY run DESC LIMIT 1""", (series_uid, model_name, before_run))
        return Job.from_row(row) if row else None

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM instances WHERE series_uid=? ORDER BY instance_number, sop_instance_uid",
            (series_uid,))

    def mark_series(self, series_uid: str, state: str, reason: str = "",
                    completed_by: str | None = None, at: float | None = None,
                    if_revision: int | None = None) -> bool:
        """Set a series' state; with `if_revision`, only if nothing arrived meanwhile (no new
        instance and no new version)."""
        sql = """UPDATE series SET state=?, reason=?, ready_requested=0,
                     completed_by=COALESCE(?, completed_by), completed_at=COALESCE(?, completed_at)
                 WHERE series_uid=?"""
        args: list[Any] = [state, reason, completed_by, at, series_uid]
        if if_revision is not None:
            sql += " AND revision=?"
            args.append(if_revision)
        with self.transaction() as tx:
            return tx.execute(sql, args).rowcount == 1

    def complete_series(self, series_uid: str, revision: int, signal: str, at: float,
                        planned: list[PlannedJob], state: str,
                        reason: str = "") -> list[tuple[int, PlannedJob]] | None:
        """Declare a series complete and create its jobs, in one transaction that holds the
        series' row. None when there is nothing to do here: the series changed since it was
        read (a new revision), is no longer receiving, or another instance is completing it
        right now (its row is locked: skipped, not waited for). Else the new jobs' ids with
        what they run (none for a model whose last run saw this revision already)."""
        with self.transaction() as tx:
            series = tx.execute(f"SELECT * FROM series WHERE series_uid=?{self.backend.skip_locked}",
                                (series_uid,)).fetchone()
            if series is None or series["state"] != "receiving" or series["revision"] != revision:
                return None
            created = [(job_id, job) for job in planned
                       if (job_id := self._create_job(tx, Series.from_row(series), job.model_name,
                                                      job.model_version, job.priority, at,
                                                      job.mode)) is not None]
            tx.execute("""UPDATE series SET state=?, reason=?, ready_requested=0, completed_by=?,
                              completed_at=? WHERE series_uid=?""",
                       (state, reason, signal, at, series_uid))
            if created:
                tx.notify("jobs")
            return created

    def create_job_if_new(self, series: Series, model_name: str, model_version: str,
                          priority: int, completed_at: float, mode: str = "active") -> int | None:
        """One job per series x model version x run; a new run only when the series changed
        since the last run (new instances, new versions, files back after retention, or a run
        asked for again: each raises the series' revision)."""
        with self.transaction() as tx:
            job_id = self._create_job(tx, series, model_name, model_version, priority, completed_at,
                                      mode)
            if job_id is not None:
                tx.notify("jobs")
            return job_id

    def _create_job(self, tx: Tx, series: Series, model_name: str, model_version: str,
                    priority: int, completed_at: float, mode: str = "active") -> int | None:
        last = tx.execute(
            """SELECT run, series_revision FROM jobs
               WHERE series_uid=? AND model_name=? AND model_version=?
               ORDER BY run DESC LIMIT 1""",
            (series.series_uid, model_name, model_version)).fetchone()
        # `series` is the row read before routing, so every model routed to it sees one revision
        if last and last["series_revision"] == series.revision:
            return None
        run = (last["run"] + 1) if last else 1
        now = time.time()
        row = tx.execute(
            """INSERT INTO jobs(series_uid, study_uid, model_name, model_version, run,
                   instance_count, priority, series_completed_at, series_revision,
                   created_at, updated_at, mode)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id""",
            (series.series_uid, series.study_uid, model_name, model_version, run,
             series.instance_count, priority, completed_at, series.revision, now, now,
             mode)).fetchone()
        return int(row["id"])

    def runs_of(self, series_uid: str) -> list[Job]:
        """The newest run per model version of a series (what `POST .../run` weighs)."""
        return [Job.from_row(r) for r in self.query(
            """SELECT j.* FROM jobs j
               WHERE j.series_uid=? AND j.run=(SELECT MAX(run) FROM jobs k WHERE
                   k.series_uid=j.series_uid AND k.model_name=j.model_name
                   AND k.model_version=j.model_version)""", (series_uid,))]

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
        """At start-up: jobs a process that is gone was running go back to the queue. SQLite
        has one instance, so every running job not `owner`'s; PostgreSQL only those leased in
        this instance's name (a previous life of it): other instances' leases run out instead."""
        with self.transaction() as tx:
            if self.shared:
                cur = tx.execute(
                    """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL
                       WHERE state='running' AND lease_owner=?""", (owner,))
            else:
                cur = tx.execute(
                    """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL
                       WHERE state='running' AND (lease_owner IS NULL OR lease_owner != ?)""",
                    (owner,))
            if cur.rowcount:
                tx.notify("jobs")
            return cur.rowcount

    # A shadow job (a model version run for comparison only) runs in the node's idle time: while
    # an active job runs or is due, another shadow job runs, or a series is still arriving (its
    # active job comes next), it waits. On 2 cores a shadow run beside an active one made the
    # active result up to 2x slower (benchmarks/shadow_cost.py).
    _SHADOW_MAY_RUN = """(mode<>'shadow' OR NOT (
        EXISTS (SELECT 1 FROM jobs o WHERE o.state='running' AND o.lease_until>=?
                                      OR (o.state='queued' AND o.mode<>'shadow' AND o.next_attempt_at<=?))
        OR EXISTS (SELECT 1 FROM series r WHERE r.state='receiving')))"""

    def lease_job(self, owner: str, lease_s: float) -> Job | None:
        """Take the next due job (highest priority first), or one whose lease expired; a job
        another instance is taking at this moment is skipped, not waited for. A shadow job only
        while nothing else runs, no active job is due and no series arrives (`_SHADOW_MAY_RUN`)."""
        now = time.time()
        with self.transaction() as tx:
            row = tx.execute(
                f"""SELECT * FROM jobs
                    WHERE ((state='queued' AND next_attempt_at<=?)
                           OR (state='running' AND lease_until<?))
                      AND {self._SHADOW_MAY_RUN}
                    ORDER BY priority DESC, id LIMIT 1{self.backend.skip_locked}""",
                (now, now, now, now)).fetchone()
            if row is None:
                return None
            tx.execute(
                """UPDATE jobs SET state='running', lease_owner=?, lease_until=?,
                       attempts=attempts+1, updated_at=? WHERE id=?""",
                (owner, now + lease_s, now, row["id"]))
            return Job.from_row({**row, "state": "running", "lease_owner": owner,
                                 "lease_until": now + lease_s, "attempts": row["attempts"] + 1})

    def next_job_at(self) -> float | None:
        """When the next job falls due: a queued one's next attempt, or a lease's expiry. A
        shadow job held back by `_SHADOW_MAY_RUN` is not due: the runner that finishes what
        holds it back takes it next."""
        now = time.time()
        row = self.query_one(
            f"""SELECT MIN(CASE WHEN state='queued' THEN next_attempt_at ELSE lease_until END) AS t
                FROM jobs WHERE state IN ('queued', 'running') AND {self._SHADOW_MAY_RUN}""",
            (now, now))
        return row["t"] if row else None

    def renew_job_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease of a job this owner still runs (a long analysis is not re-leased)."""
        now = time.time()
        with self.transaction() as tx:
            cur = tx.execute(
                """UPDATE jobs SET lease_until=? WHERE id=? AND lease_owner=? AND state='running'""",
                (now + lease_s, job_id, owner))
            return cur.rowcount == 1

    def record_job_stage(self, job_id: int, stage: str) -> None:
        """The stage the job's attempt enters; kept if the attempt or the node dies in it."""
        with self.transaction() as tx:
            tx.execute("UPDATE jobs SET stage=?, updated_at=? WHERE id=?", (stage, time.time(), job_id))

    def keep_job_analysis(self, job_id: int, analysis: dict[str, Any]) -> None:
        """The model's result for this job, kept until the job finishes (retries reuse it)."""
        with self.transaction() as tx:
            tx.execute("UPDATE jobs SET analysis=? WHERE id=?", (json.dumps(analysis), job_id))

    def retry_job_later(self, job_id: int, error: str, delay_s: float) -> None:
        now = time.time()
        with self.transaction() as tx:
            tx.execute(
                """UPDATE jobs SET state='queued', lease_until=NULL, lease_owner=NULL,
                       next_attempt_at=?, last_error=?, updated_at=? WHERE id=?""",
                (now + delay_s, error, now, job_id))

    def finish_job(self, job_id: int, state: str, result: dict[str, Any], error: str,
                   deliveries: list[tuple[str, str, dict[str, Any]]], stage: str = "") -> None:
        """Record a job's outcome and queue its deliveries in one transaction; `stage` names
        the stage a failed job failed in. A delivery queued twice (two instances finishing the
        same job after a lease ran out) is one outbox row."""
        assert state in JOB_FINAL
        now = time.time()
        present = result.get("present")
        score = result.get("score")
        with self.transaction() as tx:
            tx.execute(
                """UPDATE jobs SET state=?, result=?, last_error=?, lease_until=NULL,
                       updated_at=?, finished_at=?, stage=?, analysis=NULL, present=?, score=?
                   WHERE id=?""",
                (state, json.dumps(result), error, now, now, stage,
                 None if present is None else int(bool(present)),
                 float(score) if isinstance(score, (int, float)) else None, job_id))
            for kind, destination, payload in deliveries:
                tx.execute(
                    """INSERT INTO outbox(job_id, kind, destination, payload, created_at,
                           next_attempt_at) VALUES (?,?,?,?,?,?)
                       ON CONFLICT(job_id, kind, destination) DO NOTHING""",
                    (job_id, kind, destination, json.dumps(payload), now, now))
            if deliveries:
                tx.notify("outbox")

    def job(self, job_id: int) -> Job | None:
        row = self.query_one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return Job.from_row(row) if row else None

    def job_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # --- outbox ----------------------------------------------------------------------------

    def due_deliveries(self, now: float, limit: int = 16) -> list[Delivery]:
        """Deliveries due at `now` that no instance holds (a look, not a lease)."""
        return [Delivery.from_row(r) for r in self.query(
            """SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=?
                   AND (lease_until IS NULL OR lease_until<?)
               ORDER BY next_attempt_at, id LIMIT ?""", (now, now, limit))]

    def release_orphan_deliveries(self, owner: str) -> int:
        """At start-up: deliveries a process that is gone held go back to their schedule at once,
        as `requeue_orphans` does for jobs (SQLite: every lease not `owner`'s; PostgreSQL: only
        this instance's earlier life's). Else a node killed mid-delivery, restarted under a new
        name (default: hostname-pid), would leave its results waiting `delivery.lease_s`."""
        with self.transaction() as tx:
            if self.shared:
                cur = tx.execute("""UPDATE outbox SET lease_owner=NULL, lease_until=NULL
                                    WHERE lease_owner=?""", (owner,))
            else:
                cur = tx.execute("""UPDATE outbox SET lease_owner=NULL, lease_until=NULL
                                    WHERE lease_owner IS NOT NULL AND lease_owner != ?""", (owner,))
            if cur.rowcount:
                tx.notify("outbox")
            return cur.rowcount

    def lease_delivery(self, owner: str, lease_s: float) -> Delivery | None:
        """Take the next due delivery for `lease_s`: no other instance sends it meanwhile."""
        now = time.time()
        with self.transaction() as tx:
            row = tx.execute(
                f"""SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=?
                        AND (lease_until IS NULL OR lease_until<?)
                    ORDER BY next_attempt_at, id LIMIT 1{self.backend.skip_locked}""",
                (now, now)).fetchone()
            if row is None:
                return None
            tx.execute("UPDATE outbox SET lease_owner=?, lease_until=? WHERE id=?",
                       (owner, now + lease_s, row["id"]))
            return Delivery.from_row({**row, "lease_owner": owner, "lease_until": now + lease_s})

    def next_delivery_at(self) -> float | None:
        """When the next delivery falls due (its next attempt, or the end of its lease)."""
        row = self.query_one(
            """SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until>next_attempt_at
                               THEN lease_until ELSE next_attempt_at END) AS t
               FROM outbox WHERE state='pending'""")
        return row["t"] if row else None

    def mark_delivered(self, delivery_id: int) -> None:
        with self.transaction() as tx:
            tx.execute(
                """UPDATE outbox SET state='delivered', delivered_at=?, attempts=attempts+1,
                       lease_owner=NULL, lease_until=NULL WHERE id=?""",
                (time.time(), delivery_id))

    def mark_delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float,
                             dead: bool) -> None:
        with self.transaction() as tx:
            tx.execute(
                """UPDATE outbox SET state=?, attempts=attempts+1, last_error=?,
                       next_attempt_at=?, lease_owner=NULL, lease_until=NULL WHERE id=?""",
                ("dead" if dead else "pending", error, next_attempt_at, delivery_id))

    def resend(self, delivery_id: int) -> bool:
        with self.transaction() as tx:
            cur = tx.execute(
                """UPDATE outbox SET state='pending', next_attempt_at=0, created_at=?
                   WHERE id=? AND state IN ('dead','delivered','pending')""",
                (time.time(), delivery_id))
            tx.notify("outbox")
            return cur.rowcount == 1

    def discard_delivery(self, delivery_id: int) -> bool:
        """An admin gives up on a dead (or still pending) delivery: it is never sent."""
        with self.transaction() as tx:
            cur = tx.execute(
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

    _NOTHING_LEFT_TO_DO = """
        NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid=s.series_uid
                    AND j.state IN ('queued', 'running'))
        AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON j.id=o.job_id
                        WHERE j.series_uid=s.series_uid
                          AND o.state NOT IN ('delivered', 'discarded'))
        AND (s.state != 'routed'
             OR EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid=s.series_uid))"""

    def series_due_for_purge(self, done_before: float) -> list[str]:
        """Series with unpurged instances whose results were all delivered before `done_before`.

        Not due: a series still receiving, one with a queued or running job, one with an
        outbox row that is neither delivered nor discarded (pending or dead), or a routed
        series without jobs.
        A series that no model takes is due `done_before` after it was completed.
        """
        return [r["series_uid"] for r in self.query(
            f"""SELECT s.series_uid, s.completed_at FROM series s
                WHERE s.state IN ('routed', 'no_model', 'ignored')
                  AND EXISTS (SELECT 1 FROM instances i
                              WHERE i.series_uid=s.series_uid AND i.purged_at IS NULL)
                  AND {self._NOTHING_LEFT_TO_DO}""", ())
            if self._done_at(r["series_uid"], r["completed_at"]) < done_before]

    def _done_at(self, series_uid: str, completed_at: float | None) -> float:
        """When the series' last job finished or its last result was delivered."""
        row = self.query_one(
            """SELECT MAX(t) AS t FROM (
                   SELECT finished_at AS t FROM jobs WHERE series_uid=?
                   UNION ALL
                   SELECT o.delivered_at FROM outbox o JOIN jobs j ON j.id=o.job_id
                   WHERE j.series_uid=?) AS done""", (series_uid, series_uid))
        return (row and row["t"]) or completed_at or 0.0

    def mark_series_purged(self, series_uid: str, at: float) -> list[str]:
        """Mark the series' instances purged and return their paths, unless, checked again while
        holding the series' row, it started receiving again or got work since it was found due
        (a new run, an outbox row): then nothing, its files are still needed."""
        with self.transaction() as tx:
            series = tx.execute(
                f"SELECT s.state FROM series s WHERE s.series_uid=?{self.backend.for_update}",
                (series_uid,)).fetchone()
            if series is None or series["state"] not in ("routed", "no_model", "ignored"):
                return []
            idle = tx.execute(
                f"SELECT 1 AS idle FROM series s WHERE s.series_uid=? AND {self._NOTHING_LEFT_TO_DO}",
                (series_uid,)).fetchone()
            if not idle:
                return []
            rows = tx.execute(
                "SELECT path FROM instances WHERE series_uid=? AND purged_at IS NULL",
                (series_uid,)).fetchall()
            tx.execute("UPDATE instances SET purged_at=? WHERE series_uid=? AND purged_at IS NULL",
                       (at, series_uid))
            return [r["path"] for r in rows]

    # --- reading for the API and the worklist ---------------------------------------------

    def studies(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM studies ORDER BY first_received_at DESC")

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM studies WHERE study_uid=?", (study_uid,))

    def series_of(self, study_uid: str) -> list[Series]:
        return [Series.from_row(r) for r in self.query(
            "SELECT * FROM series WHERE study_uid=? ORDER BY first_received_at", (study_uid,))]

    def jobs_of(self, study_uid: str) -> list[Job]:
        return [Job.from_row(r) for r in self.query(
            "SELECT * FROM jobs WHERE study_uid=? ORDER BY id", (study_uid,))]

    def deliveries_of(self, study_uid: str) -> list[Delivery]:
        return [Delivery.from_row(r) for r in self.query(
            """SELECT o.* FROM outbox o JOIN jobs j ON j.id=o.job_id
               WHERE j.study_uid=? ORDER BY o.id""", (study_uid,))]

    def delivery(self, delivery_id: int) -> Delivery | None:
        row = self.query_one("SELECT * FROM outbox WHERE id=?", (delivery_id,))
        return Delivery.from_row(row) if row else None
