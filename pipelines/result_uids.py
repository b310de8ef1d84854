"""Deterministic UIDs for result objects.

A result is identified by (source series UID, model key "name@version", run number). The same
triple always gives the same UIDs, so a retried delivery never creates a duplicate; any change
(a new run after late instances, a new model version) gives new UIDs, because a PACS such as
Orthanc silently drops an instance whose SOP Instance UID it already holds.

UIDs are "2.25." followed by the decimal value of 128 bits of a SHA-256 digest (the form
PS3.5 B.2 allows for UUID-derived UIDs): at most 44 characters, no leading zeros.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def uid_from(*parts: str) -> str:
    """A valid "2.25." UID derived from `parts` (order and content both matter)."""
    text = "\x1f".join(("befund", *parts))
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")
    return f"2.25.{value}"


def is_valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, no empty or zero-padded component, at most 64 characters."""
    return len(uid) <= 64 and bool(_UID.match(uid))


@dataclass(frozen=True)
class ResultUids:
    series_uid: str  # the SR's Series Instance UID
    sr_sop_uid: str
    seg_sop_uid: str
    seg_series_uid: str
    tracking_uid: str  # TID 4108 Tracking Unique Identifier of the finding's measurement group


def result_uids(series_uid: str, model_key: str, run: int) -> ResultUids:
    """UIDs for the results of `model_key` ("name@version") on `series_uid`, run `run`."""
    if not series_uid or not model_key:
        raise ValueError("result_uids needs the source series UID and the model key name@version")
    if isinstance(run, bool) or not isinstance(run, int) or run < 0:
        raise ValueError(f"run must be an integer >= 0, got {run!r}")
    key = (series_uid.strip(), model_key.strip(), str(run))
    return ResultUids(
        series_uid=uid_from("sr-series", *key),
        sr_sop_uid=uid_from("sr-instance", *key),
        seg_sop_uid=uid_from("seg-instance", *key),
        seg_series_uid=uid_from("seg-series", *key),
        tracking_uid=uid_from("tracking", *key),
    )


def device_uid(model_key: str) -> str:
    """Device UID of an algorithm (Contributing Equipment, Device Observer UID): one per model."""
    if not model_key:
        raise ValueError("device_uid needs the model key name@version")
    return uid_from("device", model_key.strip())
