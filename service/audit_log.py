"""The audit log: who viewed or acknowledged which study, when, and from where.

It is the record a data protection officer asks for, kept in the state DB's `audit_log`
table. A row names the user, their role, the action, the Study Instance UID, the client
address and the time; it never holds a patient's name or ID (a study UID is what the reader
of the log looks up, with the rights to do so). An admin queries it (`GET /audit`) or exports
it as JSON lines (`GET /audit.jsonl`); both are themselves logged.

The worklist page polls every 2 s; the same view by the same user from the same address is
recorded once per `window_s` (a minute by default), so the log says that someone looked,
not how often their browser asked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from service.state_db import StateDB

ACTIONS = frozenset({
    "view_worklist", "view_study", "view_key_image", "acknowledge", "dismiss", "run_study",
    "resend_delivery", "discard_delivery", "view_deliveries", "view_config", "view_audit",
    "export_audit", "sign_in", "sign_out", "sign_in_refused", "view_shadow", "view_shadow_report",
})
# Repeated views within the window are one entry; acts (acknowledge, resend, ...) always count.
VIEWS = frozenset({"view_worklist", "view_study", "view_key_image", "view_deliveries",
                   "view_shadow", "view_shadow_report"})
MAX_ROWS = 10_000  # one answer of GET /audit; the export pages through everything
COLUMNS = ("id", "at", "user", "role", "action", "study_uid", "detail", "address")
_SELECTED = ", ".join(f'"{c}"' for c in COLUMNS)  # quoted: PostgreSQL reserves `user`


class AuditLog:
    def __init__(self, db: StateDB, window_s: float = 60.0, max_remembered: int = 10_000) -> None:
        self.db = db
        self.window_s = window_s
        self.max_remembered = max_remembered
        self._last: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def record(self, user: str, role: str, action: str, study_uid: str | None = None,
               address: str = "", detail: str = "", at: float | None = None) -> bool:
        """Write one entry (False when it repeats a view within the window)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        now = time.time() if at is None else at
        if action in VIEWS and not self._first_in_window((user, action, study_uid, address), now):
            return False
        with self.db.transaction() as db:
            db.execute(
                """INSERT INTO audit_log(at, "user", role, action, study_uid, detail, address)
                   VALUES (?,?,?,?,?,?,?)""",
                (now, user, role, action, study_uid, detail[:200], address[:64]))
        return True

    def _first_in_window(self, key: tuple, now: float) -> bool:
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.window_s:
                return False
            if len(self._last) >= self.max_remembered:
                self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
                while len(self._last) >= self.max_remembered:
                    del self._last[next(iter(self._last))]
            self._last[key] = now
            return True

    def query(self, user: str | None = None, study_uid: str | None = None,
              action: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 1000, after_id: int = 0) -> list[dict[str, Any]]:
        """Entries oldest first, filtered by any of the arguments."""
        where, args = ["id > ?"], [after_id]
        for column, value in (("user", user), ("study_uid", study_uid), ("action", action)):
            if value:
                where.append(f'"{column}" = ?')  # quoted: PostgreSQL reserves `user`
                args.append(value)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        if until is not None:
            where.append("at < ?")
            args.append(until)
        args.append(max(1, min(limit, MAX_ROWS)))
        return self.db.query(
            f"SELECT {_SELECTED} FROM audit_log WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT ?", tuple(args))

    def export_lines(self, **filters: Any) -> Iterator[str]:
        """Every matching entry as one JSON object per line, in pages of MAX_ROWS."""
        after = 0
        while True:
            rows = self.query(limit=MAX_ROWS, after_id=after, **filters)
            for row in rows:
                yield json.dumps({**row, "at_iso": _iso(row["at"])}, ensure_ascii=False) + "\n"
            if len(rows) < MAX_ROWS:
                return
            after = rows[-1]["id"]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}Z"
