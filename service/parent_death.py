"""Every process befund starts ends when the process that started it dies, however it dies.

BentoML starts each service worker in its own session, and the model service's decode workers
(a spawn ProcessPoolExecutor) hold both ends of their task queue, so nothing told them when
their parent was killed (kill -9, OOM killer): they lived on as orphans (110-150 MB each), and
an old gateway kept the DICOM port, the state DB and its job leases beside a restarted node.

Two mechanisms, because each alone has a gap:
- the kernel's parent-death signal (PR_SET_PDEATHSIG) fires when the *thread* that forked the
  child exits, not the process: right for a child forked by a thread that lives as long as
  the parent (BentoML's arbiter, the demo's main thread), wrong for a child forked by a worker
  thread that may end first (ProcessPoolExecutor starts workers from whichever thread submits);
- a watchdog thread in the child waits on the parent's pidfd (or polls `os.getppid()` where
  pidfds are unavailable) and ends the child when that parent process ends.
Children we write (the BentoML workers, the decode workers) run the watchdog; a child we
only start (Orthanc, `befund serve` from the demo) gets the parent-death signal.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger("befund.process")

PR_SET_PDEATHSIG = 1
POLL_S = 0.5  # how often the fallback watchdog looks at its parent pid
_LINUX = sys.platform.startswith("linux")
_libc = ctypes.CDLL(None, use_errno=True) if _LINUX else None  # loaded before any fork


def die_with_parent() -> None:
    """Call first thing in a worker process: SIGKILL from the kernel and a watchdog on the parent."""
    if not _LINUX:
        return
    parent = os.getppid()
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot ask for a parent-death signal (errno %d); the watchdog remains",
                    ctypes.get_errno())
    exit_with(parent)


def exit_with(parent_pid: int) -> None:
    """End this process when `parent_pid` (this process's parent) ends; a no-op outside Linux.

    The initializer of executor workers: `ProcessPoolExecutor(initializer=exit_with,
    initargs=(os.getpid(),))`.
    """
    if not _LINUX:
        return
    if os.getppid() != parent_pid:  # the parent died before we got here
        _end()
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # old kernel or a sandbox without pidfd_open: poll
        pidfd = None
    if os.getppid() != parent_pid:  # died (and its pid maybe reused) before pidfd_open
        _end()
    threading.Thread(target=_watch, args=(parent_pid, pidfd), name="parent-watchdog",
                     daemon=True).start()


def _watch(parent_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # a pidfd turns readable when its process ends
    else:
        while os.getppid() == parent_pid:
            threading.Event().wait(POLL_S)  # the fallback's poll interval
    _end()


def _end() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the parent-death signal would: no cleanup to hang in


def killed_with_this_process() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets SIGKILL when the calling thread ends.

    Start such children from a thread that lives as long as they should (the main thread): the
    signal follows the thread that forked the child. The parent-death setting survives exec.
    """
    if not _LINUX:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec
