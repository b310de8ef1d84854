"""The shadow report: how a model's shadow version would have done against its active version
on the same live series (`GET /models/{name}/shadow-report?since=...`, `befund model
shadow-report NAME`).

For each pair (active version, shadow version) of one model that finished jobs since `since`:
the series and studies both saw, how many both analysed, observed agreement, Cohen's kappa
(pipelines/agreement.py), each version's flag rate on the series both analysed, and the
studies where they disagree (a verdict that flips, or one version analysed a series the other
did not), by UID, never with patient names. Two jobs are paired when they ran on the same
revision of a series, i.e. on the same instances; per series the newest such revision counts.

Everything a caller gives is bounded: `since` is a date, a time or a span back from now, at
most MAX_LOOKBACK_DAYS; at most MAX_JOBS jobs are read (newest first, `truncated` says so);
at most MAX_LISTED disagreements are listed (`disagreements_total` counts them all).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.agreement import Agreement
from service.state_db import StateDB

DEFAULT_DAYS = 30
MAX_LOOKBACK_DAYS = 400
MAX_SINCE_CHARS = 40
MAX_JOBS = 200_000
MAX_LISTED = 200
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SPAN = re.compile(r"^(\d{1,6})([dhm])$")
_SPAN_S = {"d": 86400, "h": 3600, "m": 60}


class ReportError(ValueError):
    """A request the report cannot answer; the message says what to give instead."""


def parse_since(text: str | None, now: float) -> float:
    """`since` as epoch seconds: empty for the last DEFAULT_DAYS days; a span back from now
    (`7d`, `12h`, `90m`); an ISO date (`2026-12-01`, midnight UTC) or date and time (with an
    offset, else UTC). Not in the future, at most MAX_LOOKBACK_DAYS back."""
    if text is None or not text.strip():
        return now - DEFAULT_DAYS * 86400
    text = text.strip()
    if len(text) > MAX_SINCE_CHARS:
        raise ReportError(f"since: at most {MAX_SINCE_CHARS} characters")
    if m := _SPAN.match(text):
        at = now - int(m.group(1)) * _SPAN_S[m.group(2)]
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ReportError(f"since: {text!r} is neither a date (2026-12-01), a date and time "
                              "(2026-12-01T08:00:00Z) nor a span back from now (7d, 12h, 90m)") from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        at = when.timestamp()
    if at > now + 60:
        raise ReportError(f"since: {text} lies in the future")
    if at < now - MAX_LOOKBACK_DAYS * 86400:
        raise ReportError(f"since: {text} lies more than {MAX_LOOKBACK_DAYS} days back; ask for a "
                          "shorter span")
    return at


@dataclass(frozen=True)
class _Verdict:
    """One job's outcome as the report compares it (from the jobs table's narrow columns)."""

    job_id: int
    study_uid: str
    series_uid: str
    revision: int
    present: bool | None  # None: not analysed
    score: float | None
    finished_at: float

    def view(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "present": self.present, "score": self.score}


def shadow_report(db: StateDB, name: str, since: float, now: float | None = None) -> dict[str, Any]:
    """The report for model `name` over jobs finished at or after `since` (epoch seconds)."""
    if not MODEL_NAME_RE.match(name or ""):
        raise ReportError(f"{name!r} is not a model name")
    now = time.time() if now is None else now
    rows = db.query(
        """SELECT id, study_uid, series_uid, series_revision, model_version, mode, run, present,
                  score, finished_at FROM jobs
           WHERE model_name=? AND finished_at>=? AND state IN ('done', 'not_analysed', 'failed')
           ORDER BY finished_at DESC LIMIT ?""", (name, since, MAX_JOBS + 1))
    truncated = len(rows) > MAX_JOBS
    by_side: dict[tuple[str, str], dict[tuple[str, int], _Verdict]] = {}
    for r in reversed(rows[:MAX_JOBS]):  # oldest first: a later run of a revision replaces an earlier
        side = by_side.setdefault((r["mode"], r["model_version"]), {})
        side[(r["series_uid"], r["series_revision"] or 0)] = _Verdict(
            int(r["id"]), r["study_uid"], r["series_uid"], r["series_revision"] or 0,
            None if r["present"] is None else bool(r["present"]), r["score"], r["finished_at"])
    actives = sorted(v for mode, v in by_side if mode == "active")
    shadows = sorted(v for mode, v in by_side if mode == "shadow")
    pairs = [_pair(db, a, s, by_side[("active", a)], by_side[("shadow", s)])
             for a in actives for s in shadows if a != s]
    return {
        "model": name,
        "since": _iso(since), "until": _iso(now),
        "truncated": truncated,
        "active_versions": actives, "shadow_versions": shadows,
        "pairs": pairs,
        "notice": "" if pairs else (
            f"no finished jobs of both an active and a shadow version of {name} since {_iso(since)}"),
    }


def _pair(db: StateDB, active: str, shadow: str, a_jobs: dict, s_jobs: dict) -> dict[str, Any]:
    newest: dict[str, tuple[int, _Verdict, _Verdict]] = {}  # series -> its newest shared revision
    for key in a_jobs.keys() & s_jobs.keys():
        series, revision = key
        if series not in newest or revision > newest[series][0]:
            newest[series] = (revision, a_jobs[key], s_jobs[key])
    both = [(a, s) for _, a, s in newest.values()]
    analysed = [(a, s) for a, s in both if a.present is not None and s.present is not None]
    one_only = [(a, s) for a, s in both if (a.present is None) != (s.present is None)]
    table = Agreement.of((a.present, s.present) for a, s in analysed)
    flips = [(a, s) for a, s in analysed if a.present != s.present]
    disagreements = sorted(flips + one_only, key=lambda p: -max(p[0].finished_at, p[1].finished_at))
    listed = disagreements[:MAX_LISTED]
    thresholds = _thresholds(db, [v.job_id for pair in listed for v in pair])
    return {
        "active": active, "shadow": shadow,
        "series_seen_by_both": len(both),
        "studies_seen_by_both": len({a.study_uid for a, _ in both}),
        "analysed_by_both": table.n,
        "analysed_by_one_only": len(one_only),
        "analysed_by_neither": len(both) - table.n - len(one_only),
        "agreement": _round(table.observed),
        "kappa": _round(table.kappa),
        "kappa_note": "" if table.kappa is not None or not table.n else
        "undefined: both versions gave every series the same verdict",
        "flag_rate": {"active": _round(table.first_flag_rate), "shadow": _round(table.second_flag_rate)},
        "table": {"both_positive": table.both_positive, "active_only": table.first_only,
                  "shadow_only": table.second_only, "both_negative": table.both_negative},
        "seen": {"active": len({k[0] for k in a_jobs}), "shadow": len({k[0] for k in s_jobs})},
        "disagreements_total": len(disagreements),
        "disagreements": [{
            "study_uid": a.study_uid, "series_uid": a.series_uid,
            "kind": "verdict" if a.present is not None and s.present is not None else "analysed_by_one_only",
            "active": {**a.view(), "threshold": thresholds.get(a.job_id)},
            "shadow": {**s.view(), "threshold": thresholds.get(s.job_id)},
            "finished_at": max(a.finished_at, s.finished_at),
        } for a, s in listed],
    }


def _thresholds(db: StateDB, job_ids: list[int]) -> dict[int, float | None]:
    """The threshold each listed job was judged at (from its result; at most 2 x MAX_LISTED)."""
    import json

    out: dict[int, float | None] = {}
    for start in range(0, len(job_ids), 100):
        chunk = job_ids[start:start + 100]
        marks = ",".join("?" * len(chunk))
        for r in db.query(f"SELECT id, result FROM jobs WHERE id IN ({marks})", chunk):
            try:
                out[int(r["id"])] = json.loads(r["result"] or "{}").get("threshold")
            except ValueError:
                out[int(r["id"])] = None
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


MAX_ROWS = 500  # rows of the shadow view


def shadow_rows(db: StateDB, since: float, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The `ml` role's shadow view: the newest shadow jobs, each beside the active job of the
    same model on the same revision of the series (if any), by UID; no patient data."""
    shadows = db.query(
        """SELECT id, study_uid, series_uid, series_revision, model_name, model_version, state,
                  present, score, finished_at, created_at FROM jobs
           WHERE mode='shadow' AND created_at>=? ORDER BY created_at DESC, id DESC LIMIT ?""",
        (since, max(1, min(limit, MAX_ROWS))))
    out = []
    for s in shadows:
        a = db.query_one(
            """SELECT id, model_version, state, present, score FROM jobs
               WHERE mode='active' AND model_name=? AND series_uid=?
                 AND COALESCE(series_revision, -1)=?
               ORDER BY run DESC LIMIT 1""",
            (s["model_name"], s["series_uid"], -1 if s["series_revision"] is None else s["series_revision"]))
        out.append({
            "study_uid": s["study_uid"], "series_uid": s["series_uid"], "model": s["model_name"],
            "created_at": s["created_at"], "finished_at": s["finished_at"],
            "shadow": _side(s),
            "active": _side(a) if a else None,
            "agree": (None if a is None or a["present"] is None or s["present"] is None
                      else bool(a["present"]) == bool(s["present"])),
        })
    return out


def _side(row: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": int(row["id"]), "version": row["model_version"], "state": row["state"],
            "present": None if row["present"] is None else bool(row["present"]),
            "score": row["score"]}
