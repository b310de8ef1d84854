"""What the state DB hands out: typed rows, one `from_row` each, states as enums.

A series, a job and a delivery come back as frozen dataclasses, so the modules that read them
(completion, routing, job runner, outbox, study status, worklist, API) use attributes with
types instead of picking keys out of dicts, and JSON columns are decoded once, here. Each kind
of row has its own states (a job is never "pending"), each one `StrEnum`; the values are what
the DB stores, so they compare equal to the plain strings of SQL and JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SeriesState(StrEnum):
    RECEIVING = "receiving"  # instances may still come; completion watches it
    ROUTED = "routed"  # complete, with jobs for the models that take it
    NO_MODEL = "no_model"  # complete, no model takes it: "not analysed" with the reason
    IGNORED = "ignored"  # results and the like: neither analysed nor flagged


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"


class JobMode(StrEnum):
    """The mode of the model card a job was routed for (pipelines/model_lineup.py)."""

    ACTIVE = "active"  # delivered and shown to readers
    SHADOW = "shadow"  # kept and compared, never delivered, never a reader's flag


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up after dead_letter_after_s: waits for a resend or a discard
    DISCARDED = "discarded"  # an admin decided it is never sent


JOB_ACTIVE = (JobState.QUEUED, JobState.RUNNING)
JOB_FINAL = (JobState.DONE, JobState.NOT_ANALYSED, JobState.FAILED)


def _json(text: str | None, empty: Any) -> Any:
    return json.loads(text) if text else empty


@dataclass(frozen=True)
class Series:
    """One series: what routing reads from its header values, and where completion stands."""

    series_uid: str
    study_uid: str
    modality: str = ""
    body_part: str = ""
    sop_class_uid: str = ""
    descriptions: tuple[str, ...] = ()  # study description, series description
    image_type: tuple[str, ...] = ()
    instance_count: int = 0
    bytes: int = 0
    first_received_at: float | None = None
    last_received_at: float | None = None
    association_ended_at: float | None = None  # when its last open association ended
    ready_requested: bool = False
    state: SeriesState = SeriesState.RECEIVING
    reason: str = ""
    completed_at: float | None = None
    completed_by: str | None = None
    restored: int = 0
    revision: int = 0  # raised by every new instance or version: one run per revision

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Series:
        return cls(
            series_uid=row["series_uid"], study_uid=row["study_uid"],
            modality=row["modality"] or "", body_part=row["body_part"] or "",
            sop_class_uid=row["sop_class_uid"] or "",
            descriptions=tuple(_json(row["descriptions"], [])),
            image_type=tuple(_json(row["image_type"], [])),
            instance_count=row["instance_count"], bytes=row["bytes"],
            first_received_at=row["first_received_at"], last_received_at=row["last_received_at"],
            association_ended_at=row["association_ended_at"],
            ready_requested=bool(row["ready_requested"]), state=SeriesState(row["state"]),
            reason=row["reason"] or "", completed_at=row["completed_at"],
            completed_by=row["completed_by"], restored=row["restored"], revision=row["revision"])


@dataclass(frozen=True)
class Job:
    """One run of one model version on one series, with its lease, attempts and outcome."""

    id: int
    series_uid: str
    study_uid: str
    model_name: str
    model_version: str
    run: int
    instance_count: int
    state: JobState = JobState.QUEUED
    priority: int = 0
    attempts: int = 0
    lease_until: float | None = None
    lease_owner: str | None = None
    next_attempt_at: float = 0.0
    last_error: str = ""
    result: dict[str, Any] = field(default_factory=dict)  # the summary finish_job recorded
    series_completed_at: float | None = None
    series_revision: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    stage: str = ""  # the stage the last attempt entered (service/job_failures.py)
    analysis: dict[str, Any] | None = None  # an earlier attempt's model result, kept for retries
    mode: JobMode = JobMode.ACTIVE

    @property
    def shadow(self) -> bool:
        """A shadow job: its result is never delivered nor a reader's flag."""
        return self.mode is JobMode.SHADOW

    @property
    def key(self) -> str:
        """name@version, as model cards are keyed."""
        return f"{self.model_name}@{self.model_version}"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            id=int(row["id"]), series_uid=row["series_uid"], study_uid=row["study_uid"],
            model_name=row["model_name"], model_version=row["model_version"], run=row["run"],
            instance_count=row["instance_count"], state=JobState(row["state"]),
            priority=row["priority"], attempts=row["attempts"], lease_until=row["lease_until"],
            lease_owner=row["lease_owner"], next_attempt_at=row["next_attempt_at"],
            last_error=row["last_error"] or "", result=_json(row["result"], {}),
            series_completed_at=row["series_completed_at"], series_revision=row["series_revision"],
            created_at=row["created_at"], updated_at=row["updated_at"],
            finished_at=row["finished_at"], stage=row["stage"] or "",
            analysis=_json(row["analysis"], None), mode=JobMode(row.get("mode") or "active"))

    def as_dict(self) -> dict[str, Any]:
        """Plain values (states as strings), for the HL7 and webhook messages."""
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Delivery:
    """One outbox entry: a result on its way to one destination."""

    id: int
    job_id: int
    kind: str  # dicom, hl7, webhook
    destination: str
    payload: dict[str, Any] = field(default_factory=dict)
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    created_at: float = 0.0
    delivered_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(
            id=int(row["id"]), job_id=int(row["job_id"]), kind=row["kind"],
            destination=row["destination"], payload=_json(row["payload"], {}),
            state=DeliveryState(row["state"]), attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"], last_error=row["last_error"] or "",
            created_at=row["created_at"], delivered_at=row["delivered_at"],
            lease_owner=row["lease_owner"], lease_until=row["lease_until"])
