"""Everything befund changes inside pynetdicom, in one place, and why.

pynetdicom 3.0 is correct but not built for bulk ingest. What we change:

1. `STORE_RECV_CHUNKED_DATASET`: a received C-STORE data set is written fragment by fragment
   to a temp file (preamble + file meta + data set, a complete Part 10 file) instead of being
   kept in memory, so a 1 GB slide never sits in RAM.
2. Where that temp file lives: pynetdicom creates it with `tempfile.NamedTemporaryFile()` in
   the system temp dir. We make the name `NamedTemporaryFile` inside `pynetdicom.dimse_messages`
   point at a wrapper that takes the file from the receiving AE's pool of files created ahead
   in its incoming directory (inside the spool; service/incoming_files.py), so the spool can
   rename it into place instead of copying it, and the receive thread does not wait for the
   create. The wrapper finds the AE from the current thread, which is the association's DUL
   thread when decoding. That file keeps the disk watermark and the size limit while it is
   written, and turns a write error (ENOSPC) into a failed instance, not an aborted association.
3. TCP_NODELAY on accepted sockets (pynetdicom never sets it; without it DCMTK's delayed-ACK
   interplay costs ~40 ms per response) and bigger socket buffers.
4. `AssociationSocket.recv` reads in 4 KiB pieces and grows a bytearray; we read a PDU with
   `recv_into` on a preallocated buffer.
5. pynetdicom logs every PDU at DEBUG through handlers it binds to every association
   (`_config.LOG_HANDLER_LEVEL`): they are not bound (their work was thrown away at our log
   level, and they raise, with a traceback in the log, on malformed PDUs), and its logger is
   set to WARNING. It also logs every
   malformed PDU or message a peer sends as an error with a traceback, so one host could fill
   the disk: those loggers pass each message at most once a minute, without tracebacks
   (`PeerErrorLogFilter`); befund logs its own line per refusal, rate-limited per peer
   address (service/connection_gate.py).
6. Thread hand-offs. pynetdicom passes every decoded message from the DUL thread to the
   association thread through a queue that thread polls every 1 ms, and the response back
   through another queue the DUL thread polls every 1 ms. On our shared 2-core machine each
   hand-off cost several ms (wake-up plus GIL), more than the transfer itself. So:
   a. a complete C-STORE request is served inline in the DUL thread that decoded it (the
      message queue of each accepted association is a `_InlineStoreQueue`); the response is
      queued from that same thread, which sends it on its very next loop. pynetdicom itself
      serves N-EVENT-REPORT outside the association thread the same way.
   b. the DUL thread's idle `time.sleep(0.001)` becomes a `select()` on its socket with the
      same timeout, so the next PDU is read the moment it arrives (accepted associations only:
      see `_SocketWaitTime` for why requestors keep the poll).
   c. the association thread no longer wakes every 1 ms (1000 GIL grabs a second that stall
      the DUL thread whenever the OS deschedules the grabber): it waits on an event that is
      set whenever the DUL hands it something (a message, a release or abort primitive), at
      most `REACTOR_IDLE_S`.

7. Per-message pydicom work on the hot path: the file meta pynetdicom writes in front of every
   received data set (built as a FileMetaDataset, then written by pydicom), and the
   encoding of every response command set, are done by small direct encoders
   (`encode_file_meta`, `encode_command_set`); anything they do not cover falls back to
   pydicom. Tests compare their bytes with pydicom's.

8. Nothing a peer can stall runs on the accept path, and nothing a peer declares sizes a
   buffer unchecked. pynetdicom's server wraps each accepted socket with
   `SSLContext.wrap_socket` inside `get_request`, i.e. in the one thread that accepts: a
   client that connects and never speaks blocks every later TLS connection; and it reads
   whatever PDU length a peer declares. service/connection_gate.py's server accepts the plain
   socket, does the TLS handshake and reads the A-ASSOCIATE-RQ in the connection's own
   thread under a deadline and a size bound, and only then hands the socket to pynetdicom
   (the request pushed back, see `PUSHBACK_ATTR`); it also checks every later PDU header.
   `_recv_exact` itself preallocates at most `RECV_PREALLOC_BYTES` and grows only as bytes
   arrive, so even an unchecked length (an association we requested, to a PACS) costs only
   what the peer actually sends.

9. The C-STORE response. pynetdicom turns the response primitive into a DIMSE message (a
   pydicom Dataset), that into a P-DATA primitive, queues it, and on the DUL thread's next loop
   runs the state machine to encode and send the PDU: ~0.5 ms per instance here. For a
   C-STORE response with no optional fields, sent from the association's own DUL thread
   while it is in the data transfer state with nothing queued before it, we encode the PDU
   directly (`encode_store_response`) and send it at once; anything else takes pynetdicom's
   path. A test compares the bytes with pynetdicom's.

10. Data set fragments. Each P-DATA-TF PDU costs pynetdicom a PDU object, a copy per PDV,
   an FSM event and a DIMSE decode step before its bytes reach the incoming file. While a
   C-STORE data set is being received (data transfer state, the message's file open), a PDU
   whose PDVs are all middle data fragments on the message's context is read into one
   reusable buffer and written to the file directly. Every other PDU (commands, the last
   fragment, other contexts, anything malformed) is pushed back unread and read by
   pynetdicom's own `_read_pdu_data`, so the end of each message, and every error, still
   goes through pynetdicom.

`check_compatible()` verifies the internals we rely on are still there; the test suite calls
it, so a pynetdicom upgrade that moves them fails loudly instead of silently going slow or
using the system temp dir.
"""

from __future__ import annotations

import inspect
import logging
import queue
import select
import socket
import struct
import tempfile
import threading
import time
import types
from pathlib import Path

import pynetdicom
from pynetdicom import _config, association, dimse, dimse_messages, dul, fsm, service_class, transport
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from service.incoming_files import IncomingFiles, SpaceGuard

TESTED_VERSIONS = ("3.0.",)
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
INCOMING_ATTR = "_befund_incoming_files"  # an IncomingFiles, set on the AE by the listener
WAKE_ATTR = "_befund_wake"  # set on an accepted Association
REACTOR_POLL_S = 0.001  # the association reactor's own poll interval in pynetdicom 3.0
REACTOR_IDLE_S = 0.05  # our longest wait between checks (kill flag, DUL liveness)

_original_ntf = tempfile.NamedTemporaryFile
_original_read_pdu_data = dul.DULServiceProvider._read_pdu_data
PUSHBACK_ATTR = "_befund_pushback"  # bytes read ahead that pynetdicom's reader gets first
STREAM_BUFFER_ATTR = "_befund_pdu_buffer"
STREAM_MAX_PDU = 16 * 1024 * 1024  # larger PDUs go pynetdicom's way
RECV_PREALLOC_BYTES = 16 * 1024 * 1024  # _recv_exact allocates beyond this only as bytes arrive
_original_recv = transport.AssociationSocket.recv
_applied = False
_lock = threading.Lock()


def check_compatible() -> None:
    """Raise RuntimeError if the pynetdicom internals this module relies on have changed."""
    problems = []
    if not pynetdicom.__version__.startswith(TESTED_VERSIONS):
        problems.append(f"pynetdicom {pynetdicom.__version__} is untested (tested: {TESTED_VERSIONS})")
    if getattr(_config, "LOG_HANDLER_LEVEL", None) not in ("standard", "none"):
        problems.append("_config.LOG_HANDLER_LEVEL is gone")
    if not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        problems.append("_config.STORE_RECV_CHUNKED_DATASET is gone")
    if getattr(dimse_messages, "NamedTemporaryFile", None) not in (_original_ntf, _incoming_ntf):
        problems.append("dimse_messages no longer uses tempfile.NamedTemporaryFile")
    if not hasattr(transport.AssociationSocket, "recv"):
        problems.append("AssociationSocket.recv is gone")
    src = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    if "NamedTemporaryFile(" not in src:
        problems.append("DIMSEMessage.decode_msg no longer creates its temp file with NamedTemporaryFile")
    if "primitive._dataset_file = self._data_set_file" not in inspect.getsource(
            dimse_messages.DIMSEMessage.message_to_primitive):
        problems.append("a C-STORE request no longer carries its data set file (_dataset_file)")
    if "self._assoc = assoc" not in inspect.getsource(dul.DULServiceProvider.__init__):
        problems.append("DULServiceProvider no longer keeps its association in _assoc")
    if "time.sleep(self._run_loop_delay)" not in inspect.getsource(dul.DULServiceProvider.run_reactor):
        problems.append("the DUL reactor no longer idles with time.sleep")
    if "self.msg_queue.put(" not in inspect.getsource(dimse.DIMSEServiceProvider.receive_primitive):
        problems.append("DIMSEServiceProvider.receive_primitive no longer hands messages to msg_queue")
    if "time.sleep(0.001)" not in inspect.getsource(association.Association._run_reactor):
        problems.append("the association reactor no longer polls with time.sleep(0.001)")
    if not hasattr(association.Association, "_serve_request"):
        problems.append("Association._serve_request is gone")
    for name in ("encode", "create_file_meta", "write_file_meta_info"):
        if not hasattr(dimse_messages, name):
            problems.append(f"dimse_messages no longer imports {name}")
    if "self.dimse.send_msg(rsp, cx_id)" not in inspect.getsource(
            service_class.StorageServiceClass.SCP):
        problems.append("the storage SCP no longer answers through dimse.send_msg")
    if "current_state" not in inspect.getsource(fsm.StateMachine.__init__):
        problems.append("the DUL state machine no longer keeps current_state")
    if "ssl_context.wrap_socket" not in inspect.getsource(transport.AssociationServer.get_request):
        problems.append("AssociationServer.get_request no longer wraps TLS sockets itself")
    handle = inspect.getsource(transport.RequestHandler.handle)
    if "self._create_association()" not in handle or "assoc.start()" not in handle:
        problems.append("RequestHandler.handle no longer creates and starts the association")
    if not isinstance(inspect.getattr_static(transport.AssociationSocket, "ready", None), property):
        problems.append("AssociationSocket.ready is no longer a property")
    if "self.socket.recv(6)" not in inspect.getsource(_original_read_pdu_data):
        problems.append("DULServiceProvider._read_pdu_data no longer reads the PDU header with recv(6)")
    if "self.socket.ready" not in inspect.getsource(dul.DULServiceProvider._is_transport_event):
        problems.append("the DUL no longer reads only when its socket is ready")
    if problems:
        raise RuntimeError("pynetdicom internals changed: " + "; ".join(problems))


# The modules that decode what a peer sends (not ae/transport: set-up and connecting; not
# events/service_class: exceptions in befund's own handlers, whose tracebacks matter).
PEER_ERROR_LOGGERS = tuple(f"pynetdicom.{name}" for name in (
    "acse", "association", "dimse", "dimse_messages", "dimse_primitives", "dsutils", "dul", "fsm",
    "pdu", "pdu_items", "pdu_primitives", "presentation", "utils"))


class PeerErrorLogFilter(logging.Filter):
    """Lets each pynetdicom message through at most once per `interval_s`, without its
    traceback; `LOGGER.exception(exc)` records (the traceback alone) are dropped."""

    MAX_KEYS = 256

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self._interval = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return False
        record.exc_info = record.exc_text = record.stack_info = None
        key = (record.name, record.msg[:24])  # f-strings carry numbers a peer chose
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self._interval) < self._interval:
                return False
            if len(self._last) >= self.MAX_KEYS:
                self._last.clear()
            self._last[key] = now
        return True


def _incoming_ntf(*args, **kwargs):
    """A file from the receiving AE's incoming pool (falls back to the system temp dir)."""
    thread = threading.current_thread()
    assoc = getattr(thread, "_assoc", None)
    pool = getattr(getattr(assoc, "ae", None), INCOMING_ATTR, None)
    if pool is not None and "dir" not in kwargs:
        return pool.take()
    return _original_ntf(*args, **kwargs)


def _recv_exact(self, nr_bytes: int) -> bytearray:
    """Read `nr_bytes` (or fewer if the peer closes) with recv_into into one buffer; bytes
    pushed back (`PUSHBACK_ATTR`) come first. `nr_bytes` may be a length the peer declared:
    the buffer starts at most `RECV_PREALLOC_BYTES` long and doubles only as bytes arrive."""
    sock = self.socket
    pushback = getattr(self, PUSHBACK_ATTR, None) or b""
    buf = bytearray(min(nr_bytes, max(RECV_PREALLOC_BYTES, len(pushback))))
    got = min(nr_bytes, len(pushback))
    if got:
        buf[:got] = pushback[:got]
        setattr(self, PUSHBACK_ATTR, pushback[got:])
    while True:
        with memoryview(buf) as view:
            got += _recv_into(sock, view[got:])
        if got < len(buf) or len(buf) == nr_bytes:
            break
        buf.extend(bytes(min(len(buf), nr_bytes - len(buf))))
    return buf if got == nr_bytes else buf[:got]


class _InlineStoreQueue(queue.Queue):
    """The DIMSE message queue of one accepted association: C-STORE requests run inline."""

    def __init__(self, assoc, wake: threading.Event) -> None:
        super().__init__()
        self._assoc = assoc
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        context_id, msg = item
        assoc = self._assoc
        if (isinstance(msg, C_STORE) and assoc.is_acceptor and assoc.is_established
                and context_id in assoc._accepted_cx):
            assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)
        self._wake.set()


class _SocketWaitTime:
    """Stands in for the `time` module inside pynetdicom.dul: sleep waits on the socket.

    Only for associations we accept. A requestor's DUL (the outbox's C-STOREs, in the same
    process) keeps pynetdicom's plain 1 ms poll: pynetdicom's send_c_store pauses the
    requestor's reactor with a check that can pass while the reactor runs one more loop, and an
    answer handed over at once, as the socket wait does, fell into that loop, which drops it
    ("Received unexpected C-STORE service message"; the send then failed with no status)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if (isinstance(thread, dul.DULServiceProvider) and thread.to_provider_queue.empty()
                and getattr(thread.assoc, "is_acceptor", False)):
            sock = getattr(thread.socket, "socket", None)
            if sock is not None and sock.fileno() >= 0:
                try:
                    select.select([sock], [], [], seconds)
                    return
                except (OSError, ValueError):
                    pass
        time.sleep(seconds)


class _WakingQueue(queue.Queue):
    """A queue whose put() also wakes the association thread (see 6c)."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        self._wake.set()


class _ReactorTime:
    """Stands in for the `time` module inside pynetdicom.association (see 6c)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wake = getattr(threading.current_thread(), WAKE_ATTR, None)
        if wake is not None and seconds <= REACTOR_POLL_S:
            wake.wait(REACTOR_IDLE_S)
            wake.clear()
            return
        time.sleep(seconds)


def _recv_into(sock, view: memoryview) -> int:
    """Fill `view` from the socket; the number of bytes read (fewer if the peer closed)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            break
        got += n
    return got


def _read_pdu_streaming(dul_provider) -> None:
    """`_read_pdu_data` of an accepted association's DUL (see 10).

    A P-DATA-TF PDU whose PDVs are all middle data fragments of the C-STORE being received
    goes straight into its incoming file; any other PDU is pushed back and read by
    pynetdicom's own `_read_pdu_data`.
    """
    assoc_socket = dul_provider.socket
    message = dul_provider.assoc.dimse.message
    target = getattr(message, "_data_set_file", None)
    if target is None or dul_provider.state_machine.current_state != "Sta6":
        _original_read_pdu_data(dul_provider)
        return
    header = _recv_exact(assoc_socket, 6)
    pdu_type, pdu_length = (header[0], struct.unpack_from(">L", header, 2)[0]) if len(header) == 6 else (0, 0)
    if pdu_type != 0x04 or not 0 < pdu_length <= STREAM_MAX_PDU:
        setattr(assoc_socket, PUSHBACK_ATTR, bytes(header))
        _original_read_pdu_data(dul_provider)
        return
    buf = getattr(dul_provider, STREAM_BUFFER_ATTR, None)
    if buf is None or len(buf) < pdu_length:
        buf = bytearray(max(pdu_length, 65536))
        setattr(dul_provider, STREAM_BUFFER_ATTR, buf)
    view = memoryview(buf)[:pdu_length]
    got = _recv_into(assoc_socket.socket, view)
    fragments = _middle_data_fragments(view, message.context_id) if got == pdu_length else None
    if fragments is None:  # anything unusual: pynetdicom reads it from the start
        setattr(assoc_socket, PUSHBACK_ATTR, bytes(header) + bytes(view[:got]))
        _original_read_pdu_data(dul_provider)
        return
    for start, end in fragments:
        target.write(view[start:end])  # an IncomingFile: unbuffered, and it never raises


def _middle_data_fragments(pdu_body: memoryview, context_id) -> list[tuple[int, int]] | None:
    """(start, end) of each PDV's data when every PDV in the P-DATA-TF body is a data set
    fragment on `context_id` that is not the last; otherwise None."""
    out = []
    pos, end = 0, len(pdu_body)
    while pos < end:
        if pos + 6 > end:
            return None
        item_length, item_context, control = struct.unpack_from(">LBB", pdu_body, pos)
        if item_length < 2 or pos + 4 + item_length > end or item_context != context_id or control & 0x03:
            return None  # malformed, another context, a command fragment, or the last fragment
        out.append((pos + 6, pos + 4 + item_length))
        pos += 4 + item_length
    return out or None


def inline_store_requests(assoc) -> None:
    """For one accepted association: serve C-STORE requests in its DUL thread (6a) and let
    its association thread sleep until the DUL hands it something (6c)."""
    if not (assoc.dimse.msg_queue.empty() and assoc.dul.to_user_queue.empty()):
        return
    wake = threading.Event()
    assoc.dimse.msg_queue = _InlineStoreQueue(assoc, wake)
    assoc.dul.to_user_queue = _WakingQueue(wake)
    setattr(assoc, WAKE_ATTR, wake)
    assoc.dimse.send_msg = _StoreResponseSender(assoc, assoc.dimse.send_msg)
    assoc.dul._read_pdu_data = types.MethodType(_read_pdu_streaming, assoc.dul)


_STORE_RSP_OPTIONAL = ("OffendingElement", "ErrorComment")


def encode_store_response(context_id: int, *, sop_class_uid: str, sop_instance_uid: str,
                          message_id: int, status: int) -> bytes:
    """A whole P-DATA-TF PDU carrying one C-STORE-RSP command set (no data set), as
    pynetdicom encodes it: implicit VR little endian, one PDV, last command fragment."""
    body = bytearray()
    for element, vr, value in ((0x0002, "UI", sop_class_uid), (0x0100, "US", 0x8001),
                               (0x0120, "US", message_id), (0x0800, "US", 0x0101),
                               (0x0900, "US", status), (0x1000, "UI", sop_instance_uid)):
        raw = struct.pack("<H", value) if vr == "US" else _padded(value, "UI")
        body += struct.pack("<HHL", 0x0000, element, len(raw)) + raw
    command = struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


class _StoreResponseSender:
    """Stands in for `assoc.dimse.send_msg` of an accepted association (see 9)."""

    def __init__(self, assoc, send_msg) -> None:
        self._assoc = assoc
        self._send_msg = send_msg

    def __call__(self, primitive, context_id: int) -> None:
        pdu = self._encoded(primitive, context_id) if self._sends_directly(primitive) else None
        if pdu is None:
            self._send_msg(primitive, context_id)
        else:
            self._assoc.dul.socket.send(pdu)

    def _encoded(self, primitive, context_id: int) -> bytes | None:
        try:
            pdu = encode_store_response(
                context_id, sop_class_uid=primitive.AffectedSOPClassUID,
                sop_instance_uid=primitive.AffectedSOPInstanceUID,
                message_id=primitive.MessageIDBeingRespondedTo, status=primitive.Status)
        except (UnicodeError, struct.error, TypeError):
            return None
        peer_max = self._assoc.requestor.maximum_length or 0
        return pdu if not peer_max or len(pdu) - 6 <= peer_max else None

    def _sends_directly(self, primitive) -> bool:
        dul_provider = self._assoc.dul
        return (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and isinstance(primitive.Status, int) and bool(primitive.AffectedSOPClassUID)
                and bool(primitive.AffectedSOPInstanceUID)
                and all(getattr(primitive, name, None) is None for name in _STORE_RSP_OPTIONAL)
                and threading.current_thread() is dul_provider
                and dul_provider.state_machine.current_state == "Sta6"
                and dul_provider.to_provider_queue.empty()
                and dul_provider.socket is not None)


_original_encode = dimse_messages.encode
_original_create_file_meta = dimse_messages.create_file_meta
_original_write_file_meta_info = dimse_messages.write_file_meta_info
_SIMPLE_STRING_VRS = {"UI", "AE", "LO", "SH", "CS"}


def _padded(text: str, vr: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


class EncodedFileMeta(bytes):
    """File meta information already encoded (stands in for a FileMetaDataset)."""


def encode_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax,
                     implementation_uid=None, implementation_version=None) -> EncodedFileMeta:
    """Group 0002 as Explicit VR Little Endian, the same elements as pynetdicom's create_file_meta."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    implementation_uid = implementation_uid or PYNETDICOM_IMPLEMENTATION_UID
    implementation_version = implementation_version or PYNETDICOM_IMPLEMENTATION_VERSION
    body = bytearray(b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01")
    for element, value, vr in ((0x0002, sop_class_uid, "UI"), (0x0003, sop_instance_uid, "UI"),
                               (0x0010, transfer_syntax, "UI"), (0x0012, implementation_uid, "UI"),
                               (0x0013, implementation_version, "SH")):
        raw = _padded(str(value), vr)
        body += struct.pack("<HH2sH", 0x0002, element, vr.encode(), len(raw)) + raw
    return EncodedFileMeta(struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body)


def _write_file_meta_info(fp, file_meta, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, EncodedFileMeta):
        fp.write(file_meta)
    else:
        _original_write_file_meta_info(fp, file_meta, enforce_standard)


def encode_command_set(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
    """Implicit VR Little Endian encoding of a command set of plain US/UL/string elements."""
    if not (is_implicit_vr and is_little_endian) or deflated:
        return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
    out = bytearray()
    for tag, elem in sorted(ds._dict.items()):
        vr = getattr(elem, "VR", None)
        value = getattr(elem, "value", None)
        if tag >> 16 != 0 or isinstance(value, (list, tuple)) or type(elem).__name__ != "DataElement":
            return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
        if value is None or value == "":
            raw = b""
        elif vr == "US":
            raw = struct.pack("<H", value)
        elif vr == "UL":
            raw = struct.pack("<L", value)
        elif vr in _SIMPLE_STRING_VRS and isinstance(value, str):
            raw = _padded(value, vr)
        else:
            return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
        out += struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    return bytes(out)


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
        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        peer_errors = PeerErrorLogFilter()
        for name in PEER_ERROR_LOGGERS:
            logging.getLogger(name).addFilter(peer_errors)
        dul.time = _SocketWaitTime()
        dimse_messages.create_file_meta = encode_file_meta
        dimse_messages.write_file_meta_info = _write_file_meta_info
        dimse_messages.encode = encode_command_set
        association.time = _ReactorTime()
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


def set_incoming_dir(ae: pynetdicom.AE, directory: Path, guard: SpaceGuard | None = None) -> IncomingFiles:
    """Received data sets of `ae` go into files created ahead in `directory`, each kept to
    `guard` while it is written; the caller closes the returned pool when the AE stops."""
    pool = IncomingFiles(directory, guard=guard)
    setattr(ae, INCOMING_ATTR, pool)
    return pool


def serve_in_thread(ae: pynetdicom.AE, server: ThreadedAssociationServer, name: str) -> None:
    """Serve in a daemon thread kept as `server.befund_thread`, so that a readiness probe can
    tell whether the listener still accepts (`serving`); pynetdicom does not keep its thread."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    server.befund_thread = thread
    thread.start()
    ae._servers.append(server)  # where server.shutdown() and ae.shutdown() look for it


def serving(server: ThreadedAssociationServer | None) -> bool:
    """True while `server` (started by `serve_in_thread`) accepts associations."""
    thread = getattr(server, "befund_thread", None)
    return thread is not None and thread.is_alive() and server.socket.fileno() >= 0
