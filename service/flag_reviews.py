"""Acknowledge or dismiss a study's AI flag: who, when, and for which result.

A review belongs to the result it was given for (model, version, run): a new run of the study
(late images) shows again as not yet acknowledged, because nobody has looked at *it*. The
rows are kept, never changed, in the state DB's `flag_reviews` table, so the worklist shows
the latest and the audit log holds each one.
"""

from __future__ import annotations

import time
from typing import Any

from service.state_db import StateDB

ACTIONS = ("acknowledged", "dismissed")


def add_review(db: StateDB, study_uid: str, action: str, user: str, row: dict[str, Any]) -> dict[str, Any]:
    """Record `action` by `user` for the result the study row shows now."""
    if action not in ACTIONS:
        raise ValueError(f"a review is one of {', '.join(ACTIONS)}, not {action!r}")
    now = time.time()
    with db.transaction() as tx:
        tx.execute(
            """INSERT INTO flag_reviews(study_uid, action, model, model_version, run, "user", at)
               VALUES (?,?,?,?,?,?,?)""",
            (study_uid, action, row.get("model"), row.get("model_version"), row.get("run"), user, now))
    return {"action": action, "user": user, "at": now}


def latest_reviews(db: StateDB, study_uid: str | None = None) -> dict[str, dict[str, Any]]:
    """The newest review per study (of one study, when given)."""
    where, args = ("WHERE study_uid=?", (study_uid,)) if study_uid else ("", ())
    rows = db.query(
        f"""SELECT * FROM flag_reviews WHERE id IN
               (SELECT MAX(id) FROM flag_reviews {where} GROUP BY study_uid)""", args)
    return {r["study_uid"]: r for r in rows}
