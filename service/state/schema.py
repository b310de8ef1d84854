"""Versioned migrations: numbered SQL files per backend under migrations/<backend>/, applied
in order at start-up, each in its own transaction together with its row in `schema_version`.

Both backends have the same numbers and reach the same tables and columns
(tests/test_state_schema.py compares them). A state DB that an older befund made (SQLite,
before `schema_version` existed) is first brought to the shape of version 1 (the columns that
the old code added on the fly) and recorded as version 1; the later versions follow as usual.
Several instances starting at once on one PostgreSQL take turns (an advisory lock).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("befund.state")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
MIGRATION_LOCK = "befund schema migration"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations(backend_name: str) -> list[Migration]:
    """The backend's migrations, in order; numbers must run 1, 2, 3 ... without gaps."""
    found = []
    for path in sorted((MIGRATIONS / backend_name).glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), _statements(path.read_text())))
    if not found or [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations of {backend_name} are not numbered 1..{len(found)}")
    return found


def _statements(text: str) -> tuple[str, ...]:
    """Split a migration into statements: each ends with `;` at the end of a line."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return tuple(s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip())


def migrate(backend: Any) -> int:
    """Bring the state DB to the newest version; return the version it is at."""
    with backend.transaction() as tx:
        backend.lock(tx, MIGRATION_LOCK)  # two instances creating it at once would collide
        tx.execute("""CREATE TABLE IF NOT EXISTS schema_version (
                          version INTEGER PRIMARY KEY, name TEXT NOT NULL,
                          applied_at DOUBLE PRECISION NOT NULL)""")
    steps = migrations(backend.name)
    for step in steps:
        with backend.transaction() as tx:
            backend.lock(tx, MIGRATION_LOCK)  # another instance may be migrating the same DB
            done = tx.execute("SELECT 1 FROM schema_version WHERE version=?", (step.version,)).fetchone()
            if done:
                continue
            if step.version == 1 and _legacy(backend, tx):
                log.info("state DB made by an older befund: adopted as schema version 1")
            else:
                for statement in step.statements:
                    tx.execute(statement)
                log.info("state DB migrated to version %d (%s)", step.version, step.name)
            tx.execute("INSERT INTO schema_version(version, name, applied_at) VALUES (?,?,?)",
                       (step.version, step.name, time.time()))
    return steps[-1].version


def _legacy(backend: Any, tx: Any) -> bool:
    """A state DB from before versioned migrations (SQLite only): bring its columns to version 1
    as the old code did, and report True; False for an empty DB."""
    if backend.name != "sqlite":
        return False
    if not tx.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='instances'").fetchone():
        return False

    def columns(table: str) -> set[str]:
        return {r["name"] for r in tx.execute(f"PRAGMA table_info({table})").fetchall()}

    if "purged_at" not in columns("instances"):
        tx.execute("ALTER TABLE instances ADD COLUMN purged_at REAL")
    if "version" not in columns("instances"):
        tx.execute("ALTER TABLE instances ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
    series = columns("series")
    if "restored" not in series:
        tx.execute("ALTER TABLE series ADD COLUMN restored INTEGER NOT NULL DEFAULT 0")
    if "revision" not in series:
        # Before revisions, a series ran again when its count differed from its last job's,
        # or when `restored` was set: the same rule, expressed in revisions.
        tx.execute("ALTER TABLE series ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
        tx.execute("UPDATE series SET revision=instance_count+restored")
    jobs = columns("jobs")
    if "series_revision" not in jobs:
        tx.execute("ALTER TABLE jobs ADD COLUMN series_revision INTEGER")
        tx.execute("UPDATE jobs SET series_revision=instance_count")
    if "stage" not in jobs:
        tx.execute("ALTER TABLE jobs ADD COLUMN stage TEXT NOT NULL DEFAULT ''")
    if "analysis" not in jobs:
        tx.execute("ALTER TABLE jobs ADD COLUMN analysis TEXT")
    return True
