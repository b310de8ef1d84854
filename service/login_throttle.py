"""Failed logins and wrong bearer tokens, counted per client address in a sliding minute.

An address that sent `limit` wrong tokens within `window_s` gets 429 with Retry-After for
every further attempt (a right token included, or guessing would go on) until its oldest
failure leaves the window. Other addresses are not affected, and neither are browsers that
hold a session already. The table is bounded: at most `max_addresses` addresses, the one
that failed least recently is forgotten first, each with at most `limit` timestamps.
A token of 32 or more random characters cannot be guessed at this rate; the limit keeps a
scanner from trying and makes it visible in the log.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_ADDRESSES = 4096


class FailureThrottle:
    """`retry_after(address)` (0: may try), `failed(address)` after a wrong token."""

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit <= 0 or window_s <= 0 or max_addresses <= 0:
            raise ValueError("a failure throttle needs a positive limit, window and size")
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again; 0 when it may try now."""
        now = self._clock()
        times = self._recent(address, now)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, address: str) -> int:
        """Record a wrong token from `address`; returns its failures within the window."""
        now = self._clock()
        times = self._recent(address, now)
        if times is None:
            while len(self._failures) >= self.max_addresses:
                self._failures.popitem(last=False)
            times = self._failures[address] = deque(maxlen=self.limit)
        times.append(now)
        self._failures.move_to_end(address)
        return len(times)
