"""The state DB's schema: numbered migrations per backend reach the same tables and columns, and a
state DB that befund made before versioned migrations (main at ab3f855, and at 5027b3e with the
web side's accounts and audit log) is adopted and migrated with every row kept
(tests/data/make_legacy_state_db.py made them)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from service.audit_log import AuditLog
from service.flag_reviews import add_review, latest_reviews
from service.state import StateDB
from service.state.schema import migrations
from tests.test_completion_routing import instance

DATA = Path(__file__).resolve().parent / "data"
LEGACY = [DATA / "state-main-ab3f855.sqlite", DATA / "state-main-5027b3e.sqlite"]


def test_both_backends_have_the_same_numbered_migrations():
    sqlite, postgresql = migrations("sqlite"), migrations("postgresql")
    assert [(m.version, m.name) for m in sqlite] == [(m.version, m.name) for m in postgresql]
    assert len(sqlite) >= 2


def test_both_backends_reach_the_same_tables_and_columns(tmp_path, pg_server):
    lite = StateDB(tmp_path / "fresh.sqlite")
    pg = StateDB(pg_server.new_database())
    try:
        assert lite.schema_version == pg.schema_version == len(migrations("sqlite"))
        assert lite.backend.table_columns() == pg.backend.table_columns()
        assert "expected_count" not in lite.backend.table_columns()["series"]
    finally:
        lite.close()
        pg.close()


@pytest.mark.parametrize("legacy", LEGACY, ids=lambda p: p.stem)
def test_a_state_db_made_by_main_before_migrations_is_adopted_with_its_rows(tmp_path, legacy):
    path = tmp_path / "state.sqlite"
    shutil.copy(legacy, path)
    before = sqlite3.connect(path)
    tables = {r[0] for r in before.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    counts = {t: before.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("studies", "series", "instances", "jobs", "outbox", "users", "audit_log",
                        "flag_reviews") if t in tables}
    before.close()
    assert "schema_version" not in _tables(path)

    db = StateDB(path)
    fresh = StateDB(tmp_path / "fresh.sqlite")
    try:
        assert db.schema_version == len(migrations("sqlite"))
        assert [r["version"] for r in db.query("SELECT version FROM schema_version ORDER BY version")] \
            == list(range(1, db.schema_version + 1))
        assert db.backend.table_columns() == fresh.backend.table_columns()
        assert {t: db.query_one(f"SELECT COUNT(*) AS n FROM {t}")["n"] for t in counts} == counts
        done, running = db.query("SELECT state, lease_owner, series_revision FROM jobs ORDER BY id")
        assert done["state"] == "done" and running["lease_owner"] == "old-node:1"
        assert db.query_one("SELECT state FROM outbox")["state"] == "delivered"
        # the old node's job runs again here, and the DB takes new instances as before
        assert db.requeue_orphans("new-node") == 1
        assert db.lease_job("new-node", 60).series_uid == "1.2.826.0.2.1.1"
        assert db.record_instance(instance(series="1.2.826.0.1.1.2", sop="1.2.826.0.1.1.2.9",
                                           study_uid="1.2.826.0.1.1")) is True
        assert db.query_one("SELECT instance_count FROM series WHERE series_uid='1.2.826.0.1.1.2'")[
            "instance_count"] == 3
    finally:
        db.close()
        fresh.close()
    again = StateDB(path)  # opened again: nothing to migrate
    try:
        assert again.query_one("SELECT COUNT(*) AS n FROM schema_version")["n"] == again.schema_version
    finally:
        again.close()


def test_the_web_records_read_and_write_alike_on_both_backends(state_db_target):
    """audit_log and flag_reviews have a column named user, a word PostgreSQL reserves."""
    db = StateDB(state_db_target)
    try:
        audit = AuditLog(db)
        assert audit.record("anna", "radiologist", "view_study", "1.2.3", address="10.0.0.9")
        [entry] = audit.query(user="anna")
        assert (entry["user"], entry["role"], entry["study_uid"]) == ("anna", "radiologist", "1.2.3")
        add_review(db, "1.2.3", "acknowledged", "anna", {"model": "ich_ct", "model_version": "1", "run": 1})
        assert latest_reviews(db, "1.2.3")["1.2.3"]["user"] == "anna"
    finally:
        db.close()


def test_migrations_of_two_instances_starting_at_once_apply_once(pg_server):
    import threading

    url = pg_server.new_database()
    opened: list[StateDB] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(StateDB(url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert len(opened) == 3 and time.monotonic() - started < 60
        assert opened[0].query_one("SELECT COUNT(*) AS n FROM schema_version")["n"] == \
            len(migrations("postgresql"))
    finally:
        for db in opened:
            db.close()


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()
