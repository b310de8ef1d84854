"""The state DB lives in service/state/ (backends, migrations); this name stays importable."""

from service.state import (
    JOB_ACTIVE,
    JOB_FINAL,
    Delivery,
    DeliveryState,
    Job,
    JobMode,
    JobState,
    PlannedJob,
    Series,
    SeriesState,
    StateDB,
    is_postgres_url,
)

__all__ = ["JOB_ACTIVE", "JOB_FINAL", "Delivery", "DeliveryState", "Job", "JobMode", "JobState",
           "PlannedJob",
           "Series", "SeriesState", "StateDB", "is_postgres_url"]
