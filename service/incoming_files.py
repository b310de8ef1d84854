"""Files that received data sets are written into: created ahead of need, guarded while written,
and removed when their association ends without handing them over.

Creating a file takes a handle on the filesystem journal. While the journal commits (our own
fsyncs, or anyone else's on the same disk) that waits: here up to ~1.5 ms per instance, on
the association's receive thread, while the sender waits. A background thread keeps a few
empty files open and ready in the spool's incoming directory; the receive path takes one in
microseconds and creates one itself only when none is left. An unused file is empty and lies
in the incoming directory, which the spool sweeps on start, so a crash leaves nothing that
counts.

While a data set arrives (fragment by fragment, pynetdicom's and `_read_pdu_streaming`'s
writes), its file checks the free disk every few MB against the watermark and its own size
against the instance limit. On crossing either, or on any write error (ENOSPC included), it
stops writing, truncates itself to nothing and says why (`failed`); the rest of the data set
is read and dropped, and the C-STORE handler answers 0xA700 for that instance only. A file
whose association ended before its data set was complete (release, abort, closed socket,
timeout, a killed peer) is removed at once by the listener and, whatever ended it, by the
pool's own sweep once the thread that wrote it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

LOG = logging.getLogger("befund.dicom")
PREFIX = ".rx-"
SUFFIX = ".dcm"
# How much a file may write between two looks at the free disk. statvfs costs ~2 us; every
# 4 MiB that is nothing next to the write itself, and a single instance never takes the disk
# below the watermark (it checks before each allowance). Concurrent writers can overshoot by at
# most this much each between their checks.
SPACE_CHECK_BYTES = 4 * 1024 * 1024
SWEEP_EVERY_S = 0.5  # how often the pool looks for files whose writer has gone


@dataclass(frozen=True)
class SpaceGuard:
    """What an incoming file must keep to: the disk's free-space watermark and the size limit."""

    directory: str
    min_free_bytes: int = 0
    max_bytes: int | None = None

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


class IncomingFile:
    """The part of NamedTemporaryFile's interface pynetdicom uses (write, .file, .name, close),
    plus `failed`, `claim()` and `discard()` for the listener. Thread-safe: the receive thread
    writes while the association's end may discard it from another thread."""

    def __init__(self, path: str, file: BinaryIO, guard: SpaceGuard | None = None):
        self.name = path
        self.file = file  # unbuffered: a write is on disk (or refused) when it returns
        self.failed = ""  # why the data set is not kept; empty while it is
        self.written = 0
        self.owner: threading.Thread | None = None  # the thread that took it (the association's DUL)
        self._guard = guard
        self._allowance = 0  # bytes that may be written before the next look at the disk
        self._claimed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.file.closed

    @property
    def claimed(self) -> bool:
        return self._claimed

    def write(self, data) -> int:
        """Write all of `data`, or, once the file has failed, drop it (and say it was written,
        so that pynetdicom goes on reading the data set to its end)."""
        size = len(data)
        with self._lock:
            if self.failed or self.file.closed:
                return size
            if size > self._allowance and not self._allow(size):
                return size
            try:
                view = memoryview(data)
                while view:
                    n = self.file.write(view)
                    view = view[n:]
            except OSError as exc:
                self._fail(f"writing the data set failed: {exc.strerror or exc}")
                return size
            self.written += size
            self._allowance -= size
        return size

    def _allow(self, size: int) -> bool:
        """Look at the limits before writing `size` more bytes; fail the file when they forbid it."""
        guard = self._guard
        if guard is None:
            self._allowance = 1 << 62
            return True
        if guard.max_bytes is not None and self.written + size > guard.max_bytes:
            self._fail(f"instance exceeds max_instance_bytes {guard.max_bytes}")
            return False
        try:
            free = guard.free_bytes()
        except OSError as exc:
            self._fail(f"free disk unknown: {exc.strerror or exc}")
            return False
        room = free - guard.min_free_bytes
        if room < size:
            self._fail(f"free disk {free} bytes would fall below the watermark of "
                       f"{guard.min_free_bytes} bytes")
            return False
        self._allowance = min(room, max(size, SPACE_CHECK_BYTES))
        return True

    def _fail(self, reason: str) -> None:
        """Stop keeping the data set: give its bytes back to the disk at once (lock held)."""
        self.failed = reason
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(self.file.fileno(), 0)

    def claim(self) -> bool:
        """The C-STORE handler takes the complete file; False when it failed or was discarded."""
        with self._lock:
            if self.failed or self.file.closed:
                return False
            self._claimed = True
            return True

    def discard(self, reason: str) -> bool:
        """Remove a file nobody will store (its association ended first). Never one that the
        handler claimed: that one may already be in the spool under its final name."""
        with self._lock:
            if self._claimed or self.file.closed:
                return False
            self._fail(reason)
            with contextlib.suppress(OSError):
                self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)
        return True

    def close(self) -> None:
        with self._lock:
            self.file.close()

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def create_incoming(directory: Path | str, guard: SpaceGuard | None = None) -> IncomingFile:
    """A new, empty file (mode 0600, unguessable name) open for writing in `directory`."""
    fd, path = tempfile.mkstemp(suffix=SUFFIX, prefix=PREFIX, dir=directory)
    return IncomingFile(path, os.fdopen(fd, "wb", buffering=0), guard)


class IncomingFiles:
    """Keeps up to `ready` empty incoming files open in `directory`; `take()` never waits.

    Remembers every file it handed out until it is closed (stored, or refused by the handler),
    so that `discard_abandoned` can remove the ones whose association ended mid-data-set.
    """

    def __init__(self, directory: Path | str, ready: int = 4, guard: SpaceGuard | None = None):
        self.directory = str(directory)
        self.guard = guard
        self._ready: queue.Queue[IncomingFile] = queue.Queue(maxsize=ready)
        self._taken: set[IncomingFile] = set()
        self._taken_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="incoming-files", daemon=True)
        self._thread.start()

    def take(self) -> IncomingFile:
        try:
            taken = self._ready.get_nowait()
        except queue.Empty:
            taken = create_incoming(self.directory, self.guard)
        taken.owner = threading.current_thread()
        with self._taken_lock:
            self._taken.add(taken)
        return taken

    def discard_abandoned(self, owner: threading.Thread | None = None) -> int:
        """Remove the files that will never be stored: those of `owner` (an association's
        receive thread whose association ended) and those whose receiving thread is gone.
        Returns how many were removed."""
        with self._taken_lock:
            done = {f for f in self._taken if f.closed}
            ended = {f for f in self._taken - done
                     if f.owner is owner or f.owner is None or not f.owner.is_alive()}
            self._taken -= done | ended
        removed = sum(f.discard("the association ended before the data set was complete")
                      for f in ended)
        if removed:
            LOG.info("removed %d partial incoming file(s) of ended associations", removed)
        return removed

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
        swept = time.monotonic()
        while not self._stop.is_set():
            try:
                spare = create_incoming(self.directory, self.guard)
            except OSError as exc:  # disk full, directory gone: the receive path creates its own
                LOG.warning("cannot prepare incoming files in %s: %s", self.directory, exc.strerror or exc)
                self._sweep()
                self._stop.wait(5.0)
                continue
            while True:
                if time.monotonic() - swept >= SWEEP_EVERY_S:
                    self._sweep()
                    swept = time.monotonic()
                try:
                    self._ready.put(spare, timeout=SWEEP_EVERY_S)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        _discard(spare)
                        return

    def _sweep(self) -> None:
        try:
            self.discard_abandoned()
        except Exception:  # noqa: BLE001 - the pool must keep filling whatever one file does
            LOG.exception("sweeping abandoned incoming files failed")


def _discard(spare: IncomingFile) -> None:
    spare.close()
    with contextlib.suppress(OSError):
        os.unlink(spare.name)
