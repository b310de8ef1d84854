"""The node's other receiver processes (service/receiver_process.py): start, restart, stop.

The gateway's own listener is receiver 0; this starts receivers 1..N-1 with the gateway's
environment and working directory, each named `<instance>-r<k>`. One that exits is started
again (a crash must not leave the port with fewer processes for good): after a second, and
after twice as long each time one ends within `STABLE_S` of its start (one that cannot start,
e.g. while the state DB is away, is not restarted in a tight loop), at most `MAX_RESTART_DELAY_S`.
The `dicom` check fails while one is missing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

log = logging.getLogger("befund.receive")
RESTART_DELAY_S = 1.0  # between a receiver's exit and its restart
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 10.0  # a receiver that ran this long restarts after RESTART_DELAY_S again
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL after this long


class ReceiverPool:
    def __init__(self, owner: str, count: int) -> None:
        self.names = [f"{owner}-r{k}" for k in range(1, count)]
        self._procs: dict[str, subprocess.Popen] = {}
        self._started: dict[str, float] = {}
        self._delay: dict[str, float] = {}
        self._due: dict[str, float] = {}  # when a receiver that ended starts again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.names:
            return
        for name in self.names:
            self._spawn(name)
        self._thread = threading.Thread(target=self._watch, name="receiver-pool", daemon=True)
        self._thread.start()
        log.info("%d more receiver process(es) on the DICOM port", len(self.names))

    def _spawn(self, name: str) -> None:
        self._started[name] = time.monotonic()
        self._due.pop(name, None)
        self._procs[name] = subprocess.Popen(  # noqa: S603 - our own module, our own interpreter
            [sys.executable, "-m", "service.receiver_process", "--owner", name],
            cwd=os.getcwd(), env=dict(os.environ))

    def _watch(self) -> None:
        while not self._stop.wait(RESTART_DELAY_S / 4):
            now = time.monotonic()
            for name, proc in list(self._procs.items()):
                if proc.poll() is None or self._stop.is_set():
                    continue
                if name not in self._due:
                    short = now - self._started[name] < STABLE_S
                    delay = min(MAX_RESTART_DELAY_S, 2 * self._delay.get(name, RESTART_DELAY_S / 2)) \
                        if short else RESTART_DELAY_S
                    self._delay[name] = delay
                    self._due[name] = now + delay
                    log.warning("receiver process %s ended with %s; starting it again in %.0f s", name,
                                proc.returncode, delay)
                elif now >= self._due[name]:
                    self._spawn(name)

    def running(self) -> int:
        """Receiver processes of this pool that run now."""
        return sum(1 for p in self._procs.values() if p.poll() is None)

    @property
    def size(self) -> int:
        return len(self.names)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.poll() is None]

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
