"""BentoML worker processes die with the `befund serve` process that started them.

BentoML starts each service worker in its own session, so when the server process is killed
(kill -9, OOM killer) its workers used to live on as orphans: the old gateway kept the DICOM
port, the state DB and its job leases while a restarted node ran beside it. On Linux each
worker asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("befund.process")

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Call first thing in a worker process; a no-op outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot tie this worker to its parent (errno %d)", ctypes.get_errno())
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
