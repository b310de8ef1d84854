"""Log lines for operators: one per event, UIDs and durations, never patient names or IDs."""

from __future__ import annotations

import logging
import os


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
