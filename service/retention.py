"""Retention: removes a series' spool files once all its results are delivered and
`retention_hours` have passed since.

Never touches a series that is still receiving or that has a queued or running job or an
outbox row that is not delivered (pending or dead). DB rows stay; the instances are marked
purged (`instances.purged_at`), so the worklist keeps its history. Directories are left in
place: removing one could race with the listener, which may be storing into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from service.state_db import StateDB

log = logging.getLogger("befund.retention")

MIN_CHECK_S = 0.5  # how often the cleaner looks: half the retention age, within these bounds
MAX_CHECK_S = 300.0


class RetentionCleaner:
    def __init__(self, db: StateDB, spool_root: Path, retention_hours: float):
        self.db = db
        self.spool_root = Path(spool_root)
        self.retention_s = retention_hours * 3600.0
        self.check_s = min(MAX_CHECK_S, max(MIN_CHECK_S, self.retention_s / 2))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.sweep(time.time())
            except Exception:  # noqa: BLE001 - the cleaner must never take the node down
                log.exception("retention sweep failed")

    def sweep(self, now: float) -> int:
        """Purge every series that is due; return the number of files removed."""
        removed = 0
        for series_uid in self.db.series_due_for_purge(now - self.retention_s):
            paths = self.db.mark_series_purged(series_uid, now)
            n = sum(self._remove(Path(p), now) for p in paths)
            removed += n
            log.info("series %s: %d spool file(s) removed after retention", series_uid, n)
        return removed

    def _remove(self, path: Path, cutoff: float) -> int:
        """Unlink one file unless it was (re)written after the purge decision (a re-sent instance)."""
        if self.spool_root not in path.parents:
            log.warning("not removing %s: outside the spool", path)
            return 0
        try:
            if path.stat().st_mtime >= cutoff:
                return 0
            path.unlink()
        except FileNotFoundError:
            return 0
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return 1
