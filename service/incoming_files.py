"""Files that received data sets are written into, created ahead of need.

Creating a file takes a handle on the filesystem journal. While the journal commits (our own
fsyncs, or anyone else's on the same disk) that waits: here up to ~1.5 ms per instance, on
the association's receive thread, while the sender waits. A background thread keeps a few
empty files open and ready in the spool's incoming directory; the receive path takes one in
microseconds and creates one itself only when none is left. An unused file is empty and lies
in the incoming directory, which the spool sweeps on start, so a crash leaves nothing that
counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

LOG = logging.getLogger("befund.dicom")
PREFIX = ".rx-"
SUFFIX = ".dcm"


class IncomingFile:
    """The part of NamedTemporaryFile's interface pynetdicom uses: write, .file, .name, close."""

    def __init__(self, path: str, file: BinaryIO):
        self.name = path
        self.file = file

    def write(self, data) -> int:
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def create_incoming(directory: Path | str) -> IncomingFile:
    """A new, empty file (mode 0600, unguessable name) open for writing in `directory`."""
    fd, path = tempfile.mkstemp(suffix=SUFFIX, prefix=PREFIX, dir=directory)
    return IncomingFile(path, os.fdopen(fd, "wb"))


class IncomingFiles:
    """Keeps up to `ready` empty incoming files open in `directory`; `take()` never waits."""

    def __init__(self, directory: Path | str, ready: int = 4):
        self.directory = str(directory)
        self._ready: queue.Queue[IncomingFile] = queue.Queue(maxsize=ready)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="incoming-files", daemon=True)
        self._thread.start()

    def take(self) -> IncomingFile:
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return create_incoming(self.directory)

    def close(self) -> None:
        """Stop filling and remove the files nobody took."""
        self._stop.set()
        self._thread.join(timeout=10)
        while True:
            try:
                spare = self._ready.get_nowait()
            except queue.Empty:
                return
            _discard(spare)

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                spare = create_incoming(self.directory)
            except OSError as exc:  # disk full, directory gone: the receive path creates its own
                LOG.warning("cannot prepare incoming files in %s: %s", self.directory, exc.strerror or exc)
                self._stop.wait(5.0)
                continue
            while True:
                try:
                    self._ready.put(spare, timeout=0.5)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        _discard(spare)
                        return


def _discard(spare: IncomingFile) -> None:
    spare.close()
    with contextlib.suppress(OSError):
        os.unlink(spare.name)
