"""The state DB and its backends: SQLite (embedded default) and PostgreSQL (several instances)."""

from service.state.db import JOB_ACTIVE, JOB_FINAL, PlannedJob, StateDB, is_postgres_url

__all__ = ["JOB_ACTIVE", "JOB_FINAL", "PlannedJob", "StateDB", "is_postgres_url"]
