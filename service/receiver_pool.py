"""The node's other receiver processes (service/receiver_process.py): start, restart, stop.

The gateway's own listener is receiver 0; this starts receivers 1..N-1 with the gateway's
environment and working directory, each named `<instance>-r<k>`. One that exits is started
again after a second (a crash must not leave the port with fewer processes for good); the
`dicom` check fails while one is missing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger("befund.receive")
RESTART_DELAY_S = 1.0  # between a receiver's exit and its restart
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL after this long


class ReceiverPool:
    def __init__(self, owner: str, count: int) -> None:
        self.names = [f"{owner}-r{k}" for k in range(1, count)]
        self._procs: dict[str, subprocess.Popen] = {}
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
        self._procs[name] = subprocess.Popen(  # noqa: S603 - our own module, our own interpreter
            [sys.executable, "-m", "service.receiver_process", "--owner", name],
            cwd=os.getcwd(), env=dict(os.environ))

    def _watch(self) -> None:
        while not self._stop.wait(RESTART_DELAY_S):
            for name, proc in list(self._procs.items()):
                if proc.poll() is not None and not self._stop.is_set():
                    log.warning("receiver process %s ended with %s; starting it again", name,
                                proc.returncode)
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
