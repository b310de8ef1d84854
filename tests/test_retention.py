"""Retention: the spool files of a series go once all its results are delivered and the
retention age has passed; series with work still to do keep theirs; DB rows stay, marked purged."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from service.retention import RetentionCleaner
from service.state_db import StateDB

RETENTION_HOURS = 0.0003  # about 1 s


def spooled_series(db: StateDB, spool: Path, series_uid: str, n: int = 3, at: float = 0.0) -> list[Path]:
    paths = []
    for i in range(n):
        path = spool / "1.2" / series_uid / f"{series_uid}.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM")
        os.utime(path, (at, at))
        db.record_instance(SimpleNamespace(
            path=path, size=4, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=f"{series_uid}.{i}", series_uid=series_uid, study_uid="1.2",
            transfer_syntax="1.2.840.10008.1.2.1", modality="CT", body_part="HEAD",
            descriptions=("", ""), image_type=(), instance_number=i, number_of_frames=None,
            patient_name="", patient_id="", accession="", study_date="", calling_ae="T",
            peer_address="127.0.0.1", association_id="a", received_at=at))
        paths.append(path)
    return paths


def finished_job(db: StateDB, series_uid: str, delivery: str | None, at: float,
                 job_state: str = "done") -> None:
    series = db.series(series_uid)
    db.mark_series(series_uid, "routed", completed_by="test", at=at)
    job_id = db.create_job_if_new(series, "ich_ct", "1", 0, at)
    if job_state == "queued":
        return
    deliveries = [("dicom", "pacs", {"files": []})] if delivery else []
    db.finish_job(job_id, job_state, {}, "", deliveries)
    with db.transaction() as tx:
        tx.execute("UPDATE jobs SET finished_at=? WHERE id=?", (at, job_id))
        if delivery:
            tx.execute("UPDATE outbox SET state=?, delivered_at=? WHERE job_id=?",
                       (delivery, at if delivery == "delivered" else None, job_id))


def test_spool_is_cleaned_after_delivery_and_retention_but_not_before(tmp_path, state_db_target):
    db = StateDB(state_db_target)
    spool = tmp_path / "spool"
    old = time.time() - 10.0
    delivered = spooled_series(db, spool, "1.2.1", at=old)
    pending = spooled_series(db, spool, "1.2.2", at=old)
    dead = spooled_series(db, spool, "1.2.3", at=old)
    queued = spooled_series(db, spool, "1.2.4", at=old)
    fresh = spooled_series(db, spool, "1.2.5", at=old)
    receiving = spooled_series(db, spool, "1.2.6", at=old)
    finished_job(db, "1.2.1", "delivered", old)
    finished_job(db, "1.2.2", "pending", old)
    finished_job(db, "1.2.3", "dead", old)
    finished_job(db, "1.2.4", None, old, job_state="queued")
    finished_job(db, "1.2.5", "delivered", time.time())  # delivered just now: not yet due

    cleaner = RetentionCleaner(db, spool, RETENTION_HOURS)
    assert cleaner.sweep(time.time()) == len(delivered)

    assert not any(p.exists() for p in delivered)
    for kept in (pending, dead, queued, fresh, receiving):
        assert all(p.exists() for p in kept)
    rows = db.query("SELECT series_uid, purged_at FROM instances ORDER BY sop_instance_uid")
    assert len(rows) == 18  # DB rows are kept
    assert {r["series_uid"] for r in rows if r["purged_at"]} == {"1.2.1"}
    assert db.query_one("SELECT instance_count FROM series WHERE series_uid='1.2.1'")[
        "instance_count"] == 3

    # The pending delivery goes through; one retention age later its files go too.
    with db.transaction() as tx:
        tx.execute("UPDATE outbox SET state='delivered', delivered_at=? WHERE state='pending'",
                   (old,))
    assert cleaner.sweep(time.time()) == len(pending)
    assert not any(p.exists() for p in pending)
    assert all(p.exists() for p in dead)


def test_a_file_rewritten_after_the_purge_decision_is_kept(tmp_path, state_db_target):
    db = StateDB(state_db_target)
    spool = tmp_path / "spool"
    old = time.time() - 10.0
    paths = spooled_series(db, spool, "1.2.7", at=old)
    finished_job(db, "1.2.7", "delivered", old)
    os.utime(paths[0], None)  # re-sent just now, after the decision below was taken
    removed = RetentionCleaner(db, spool, RETENTION_HOURS).sweep(time.time() - 1.0)
    assert removed == 2 and paths[0].exists()


def test_default_retention_checks_at_most_every_five_minutes(tmp_path):
    cleaner = RetentionCleaner(StateDB(tmp_path / "s.sqlite"), tmp_path, 168.0)
    assert cleaner.check_s == 300.0
