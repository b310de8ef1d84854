"""The node's files hold patient data (state DB, spool, results): only the node's user reads them.

`befund serve` and every worker set the umask to 0o077 before they create a file, so every
file is created 0600 and every directory 0700, however it is created (SQLite, mkstemp,
open, mkdir; SQLite gives its -wal and -shm files the mode of the database). A var dir that
an older node created with looser modes keeps working: at start-up its top level is tightened,
which closes everything below it to other users without walking a large spool.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("befund.files")

PRIVATE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def keep_files_private() -> None:
    """Set this process's umask so that what it creates from now on is private (inherited by
    the processes it starts)."""
    os.umask(PRIVATE_UMASK)


def tighten_var_dir(var: Path) -> list[str]:
    """Close `var` and its direct entries (DB files, token, spool and results folders) to other
    users; returns what was changed, for one log line. Failures are logged, never raised: a
    node that cannot chmod (another owner) still runs."""
    changed = []
    for path in [var, *sorted(var.iterdir())]:
        try:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
                continue
            private = PRIVATE_DIR if stat.S_ISDIR(st.st_mode) else PRIVATE_FILE
            path.chmod(stat.S_IMODE(st.st_mode) & private)
            changed.append(f"{path.name} {oct(stat.S_IMODE(st.st_mode))}")
        except OSError as exc:
            log.warning("cannot make %s private to the node's user: %s", path, exc.strerror or exc)
    if changed:
        log.info("var dir %s was open to other users; now private: %s", var, ", ".join(changed))
    return changed
