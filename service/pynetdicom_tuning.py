"""Everything befund changes inside pynetdicom, in one place, and why.

pynetdicom 3.0 is correct but not built for bulk ingest. What we change:

1. `STORE_RECV_CHUNKED_DATASET`: a received C-STORE data set is written fragment by fragment
   to a temp file (preamble + file meta + data set, a complete Part 10 file) instead of being
   kept in memory, so a 1 GB slide never sits in RAM.
2. Where that temp file lives: pynetdicom creates it with `tempfile.NamedTemporaryFile()` in
   the system temp dir. We make the name `NamedTemporaryFile` inside `pynetdicom.dimse_messages`
   point at a wrapper that creates the file in the receiving AE's incoming directory (inside
   the spool), so the spool can rename it into place instead of copying it. The wrapper finds
   the AE from the current thread, which is the association's DUL thread when decoding.
3. TCP_NODELAY on accepted sockets (pynetdicom never sets it; without it DCMTK's delayed-ACK
   interplay costs ~40 ms per response) and bigger socket buffers.
4. `AssociationSocket.recv` reads in 4 KiB pieces and grows a bytearray; we read a PDU with
   `recv_into` on a preallocated buffer.
5. pynetdicom logs every PDU at DEBUG: its logger is set to WARNING.

`check_compatible()` verifies the internals we rely on are still there; the test suite calls
it, so a pynetdicom upgrade that moves them fails loudly instead of silently going slow or
using the system temp dir.
"""

from __future__ import annotations

import inspect
import logging
import socket
import tempfile
import threading
from pathlib import Path

import pynetdicom
from pynetdicom import _config, dimse_messages, dul, transport

TESTED_VERSIONS = ("3.0.",)
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
INCOMING_ATTR = "_befund_incoming_dir"  # set on a pynetdicom AE by the listener

_original_ntf = tempfile.NamedTemporaryFile
_original_recv = transport.AssociationSocket.recv
_applied = False
_lock = threading.Lock()


def check_compatible() -> None:
    """Raise RuntimeError if the pynetdicom internals this module relies on have changed."""
    problems = []
    if not pynetdicom.__version__.startswith(TESTED_VERSIONS):
        problems.append(f"pynetdicom {pynetdicom.__version__} is untested (tested: {TESTED_VERSIONS})")
    if not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        problems.append("_config.STORE_RECV_CHUNKED_DATASET is gone")
    if getattr(dimse_messages, "NamedTemporaryFile", None) not in (_original_ntf, _incoming_ntf):
        problems.append("dimse_messages no longer uses tempfile.NamedTemporaryFile")
    if not hasattr(transport.AssociationSocket, "recv"):
        problems.append("AssociationSocket.recv is gone")
    src = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    if "NamedTemporaryFile(" not in src:
        problems.append("DIMSEMessage.decode_msg no longer creates its temp file with NamedTemporaryFile")
    if "self._assoc = assoc" not in inspect.getsource(dul.DULServiceProvider.__init__):
        problems.append("DULServiceProvider no longer keeps its association in _assoc")
    if problems:
        raise RuntimeError("pynetdicom internals changed: " + "; ".join(problems))


def _incoming_ntf(*args, **kwargs):
    """NamedTemporaryFile in the receiving AE's incoming dir (falls back to the system temp dir)."""
    thread = threading.current_thread()
    assoc = getattr(thread, "_assoc", None)
    directory = getattr(getattr(assoc, "ae", None), INCOMING_ATTR, None)
    if directory is not None and "dir" not in kwargs:
        kwargs["dir"] = directory
        kwargs.setdefault("prefix", ".rx-")
    return _original_ntf(*args, **kwargs)


def _recv_exact(self, nr_bytes: int) -> bytearray:
    """Read `nr_bytes` (or fewer if the peer closes) with recv_into into one buffer."""
    sock = self.socket
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    del view
    return buf


def apply() -> None:
    """Apply the changes once per process (idempotent)."""
    global _applied
    with _lock:
        if _applied:
            return
        check_compatible()
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _incoming_ntf
        transport.AssociationSocket.recv = _recv_exact
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        _applied = True


def tune_socket(sock: socket.socket | None) -> None:
    """TCP_NODELAY and large buffers on an accepted connection."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    except OSError:
        pass


def set_incoming_dir(ae: pynetdicom.AE, directory: Path) -> None:
    setattr(ae, INCOMING_ATTR, str(directory))
