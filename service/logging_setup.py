"""Log lines for operators: one per event, UIDs and durations, never patient names or IDs."""

from __future__ import annotations

import logging
import os
from urllib.parse import quote

# Kept as they are in a logged path or header: printable ASCII without space, % or backslash.
_SAFE = "!#$&'()*+,/:;=?@[]~-._"


def printable(text: str, limit: int = 120) -> str:
    """Peer-controlled text (a request path, an Origin) as one log-safe token: control, space,
    `%` and non-ASCII characters percent-encoded (a decoded `%0a` cannot start a forged line),
    cut after `limit` characters with the full length said."""
    shown = quote(text[:limit], safe=_SAFE, errors="backslashreplace")
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}...({len(text)} chars)"


def configure_logging() -> None:
    level = os.environ.get("BEFUND_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger("befund")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # pynetdicom logs whole datasets (patient names included) at DEBUG/INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
