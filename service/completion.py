"""When is a series complete? Several signals, not only a quiet timer.

A series is ready when, in this order of precedence:
- the API asked for it (`POST /studies/{uid}/run`),
- the header-declared number of instances has arrived,
- the association that delivered its last instance ended `settle_s` ago and nothing came since,
- nothing arrived for `quiet_s` (the fallback for senders that keep associations open).
"""

from __future__ import annotations

from typing import Any


def completion_signal(series: dict[str, Any], now: float, settle_s: float, quiet_s: float) -> str:
    """Return what made the series complete ('api', 'expected', 'association', 'quiet') or ''."""
    if series["ready_requested"]:
        return "api"
    last = series["last_received_at"] or 0.0
    expected = series.get("expected_count")
    if expected and series["instance_count"] >= expected:
        return "expected"
    ended = series["association_ended_at"]
    if ended is not None and ended >= last and now - ended >= settle_s:
        return "association"
    if now - last >= quiet_s:
        return "quiet"
    return ""


def next_deadline(series: dict[str, Any], settle_s: float, quiet_s: float) -> float:
    """The earliest time at which `completion_signal` could turn true without new events."""
    last = series["last_received_at"] or 0.0
    ended = series["association_ended_at"]
    candidates = [last + quiet_s]
    if ended is not None and ended >= last:
        candidates.append(ended + settle_s)
    return min(candidates)
