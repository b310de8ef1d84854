"""The state DB and its backends: SQLite (embedded default) and PostgreSQL (several instances)."""

from service.state.db import PlannedJob, StateDB, is_postgres_url
from service.state.rows import (
    JOB_ACTIVE,
    JOB_FINAL,
    Delivery,
    DeliveryState,
    Job,
    JobMode,
    JobState,
    Series,
    SeriesState,
)

__all__ = ["JOB_ACTIVE", "JOB_FINAL", "Delivery", "DeliveryState", "Job", "JobMode", "JobState", "PlannedJob",
           "Series", "SeriesState", "StateDB", "is_postgres_url"]
