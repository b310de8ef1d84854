"""What the state DB's two backends share: the transaction handle, notifications, and the one
place where the SQL of `StateDB` (written with `?` placeholders) meets PostgreSQL's dialect.

The dialect differences `StateDB` needs are few and live on the backend object: placeholders
(`?` here, `%s` for psycopg, translated by `pyformat`), row locks (`for_update`, `skip_locked`:
empty in SQLite, whose `BEGIN IMMEDIATE` is the single writer's lock), a lock on a key inside
a transaction (`lock`), and the errors that mean "the state DB cannot be reached" (`errors`).
Ids come back through `RETURNING id` and upserts are `ON CONFLICT`, which both speak alike.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("befund.state")

# What a transaction can announce to every instance's waiting threads (LISTEN/NOTIFY in
# PostgreSQL, in-process callbacks in SQLite): a job is due, a delivery is due, a series may be
# complete (an association ended, the API asked).
CHANNELS = ("jobs", "outbox", "series")


class Tx:
    """One transaction: `execute(sql, args)` with `?` placeholders; rows are dicts.
    `notify(channel)` wakes the waiting threads of every instance once it commits."""

    def __init__(self) -> None:
        self.channels: set[str] = set()

    def execute(self, sql: str, args: tuple | list = ()) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def notify(self, channel: str) -> None:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        self.channels.add(channel)


class Notifications:
    """Callbacks per channel; `dispatch` runs them (after a commit, or a NOTIFY from elsewhere)."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[], None]]] = {c: [] for c in CHANNELS}
        self._lock = threading.Lock()

    def subscribe(self, channel: str, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks[channel].append(callback)

    def dispatch(self, channels: Iterable[str]) -> None:
        for channel in channels:
            with self._lock:
                callbacks = list(self._callbacks.get(channel, ()))
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - a waiter's failure is not the writer's
                    log.exception("notification callback for %s failed", channel)


@functools.lru_cache(maxsize=512)
def pyformat(sql: str) -> str:
    """`?` placeholders outside string literals become `%s`; a literal `%` becomes `%%`."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if ch == "%":
            out.append("%%")
        elif quote:
            out.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)
