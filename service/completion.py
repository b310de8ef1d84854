"""When is a series complete? Several signals, not only a quiet timer.

A series is ready when, in this order of precedence:
- the API asked for it (`POST /studies/{uid}/run`),
- every association that delivered it has ended (at any instance), the last one `settle_s`
  ago, and nothing came since,
- nothing arrived for `quiet_s` (the fallback for senders that keep associations open, and for
  an association whose instance died).

No "expected count": a C-STORE announces no series size. Number of Series Related Instances
(0020,1209) exists only in query (C-FIND) responses, never in a stored instance; Images in
Acquisition (0020,1002) is optional, most modalities leave it out, and it counts one
acquisition, not the series (a series of two acquisitions would complete at half its size). A
series completed early is analysed on part of its slices, and its first SR could say "absent"
for a bleed in the slices still on the wire. The protocol that does announce a series' instances
is MPPS (N-SET of the Performed Series Sequence), which a PACS's auto-forward does not pass on.
"""

from __future__ import annotations

from service.state.rows import Series


def completion_signal(series: Series, now: float, settle_s: float, quiet_s: float) -> str:
    """Return what made the series complete ('api', 'association', 'quiet') or ''."""
    if series.ready_requested:
        return "api"
    last = series.last_received_at or 0.0
    ended = series.association_ended_at
    if ended is not None and ended >= last and now - ended >= settle_s:
        return "association"
    if now - last >= quiet_s:
        return "quiet"
    return ""


def next_deadline(series: Series, settle_s: float, quiet_s: float) -> float:
    """The earliest time at which `completion_signal` could turn true without new events."""
    last = series.last_received_at or 0.0
    ended = series.association_ended_at
    candidates = [last + quiet_s]
    if ended is not None and ended >= last:
        candidates.append(ended + settle_s)
    return min(candidates)
