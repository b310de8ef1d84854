"""Browser logins: random session values with an expiry, held in the gateway's memory.

The login cookie carries one of these values, never the node's API token: a cookie that
leaks (a shared workstation, a proxy log) ends with its session, at `/logout` or after
`http_session_hours`, and does not open the API to scripts. The table keeps a SHA-256 of
each value, not the value, and holds at most `max_sessions` (the oldest goes first). A
restart of the node ends every session: radiologists sign in again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class SessionTable:
    """`create(who)` a session, `valid(value)` and `who(value)` while it lasts, `end(value)` at
    logout. `who` is the signed-in principal (service/users.py), kept beside the expiry."""

    def __init__(self, lifetime_s: float, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if lifetime_s <= 0 or max_sessions <= 0:
            raise ValueError("a session table needs a positive lifetime and size")
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._expiry: dict[bytes, float] = {}  # digest -> monotonic expiry, oldest first
        self._who: dict[bytes, Any] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def create(self, who: Any = None) -> str:
        """A new session value (256 random bits, URL-safe) for the login cookie."""
        now = self._clock()
        if len(self._expiry) >= self.max_sessions:
            self._drop_expired(now)
        while len(self._expiry) >= self.max_sessions:
            self._forget(next(iter(self._expiry)))
        value = secrets.token_urlsafe(32)
        self._expiry[_digest(value)] = now + self.lifetime_s
        self._who[_digest(value)] = who
        return value

    def who(self, value: str | None) -> Any:
        """The principal of a valid session; None when the session is unknown or over."""
        return self._who.get(_digest(value)) if self.valid(value) else None

    def valid(self, value: str | None) -> bool:
        if not value:
            return False
        key = _digest(value)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            self._forget(key)
            return False
        return True

    def end(self, value: str | None) -> bool:
        """Forget the session (logout); True if it was known."""
        if not value:
            return False
        key = _digest(value)
        known = key in self._expiry
        self._forget(key)
        return known

    def _forget(self, key: bytes) -> None:
        self._expiry.pop(key, None)
        self._who.pop(key, None)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            self._forget(key)
