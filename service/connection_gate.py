"""The DICOM listener's door: what a connection must do before pynetdicom sees it, and the
length check on every PDU after.

A peer is unauthenticated until its A-ASSOCIATE-RQ has been read and checked against the
allow-list, so until then it may cost the node only what these limits allow:

- per address, at most `max_connections_per_address` open connections (checked at accept; a
  connection over the limit is closed at once). With the default 16 and `max_associations` 32,
  one host, allowed or not, can never hold every association slot, while a PACS that sends on
  several associations at once (commonly 1 to 8) is not held back;
- a new connection has `association_request_timeout_s` (5 s) to send its whole A-ASSOCIATE-RQ
  (TLS: after `tls.handshake_timeout_s` for the handshake). Until then it is read here, in the
  connection's own thread, and takes no slot of `max_associations`: pynetdicom only sees it,
  with the request pushed back in front of the socket, once the request is complete;
- an A-ASSOCIATE-RQ longer than `max_associate_rq_bytes` or that pynetdicom cannot decode,
  a first PDU that is not one, and unknown PDU types are protocol errors;
- the kernel queues `listen_backlog` connections (1024) before accept (socketserver's default
  is 5, less than one PACS opening associations in a burst). A full queue drops every peer's new
  connections alike (a dropped SYN is retried after 1, 3, 7, 15 and 31 s), so a host that
  reopens at once whatever the gate closes must not be able to keep it full: 200 such
  connections (tests/test_hostile_peers.py), on 2 busy cores, overflowed a queue of 128 117
  times in a minute (one good storescu once waited over 30 s to connect), 66 times when each
  wake of the accept loop takes every queued connection, and never with 1024. The accept loop
  does take them all per wake, and resets those over the per-address cap (no FIN exchange, no
  TIME_WAIT entry each). More connections at once than the queue holds are a flood for the
  firewall (README, "What it leaves to the network").

Inside an association every PDU header is checked before its body is read (`guard`): a
P-DATA-TF longer than the `max_pdu` befund announced, an association PDU longer than
`max_associate_rq_bytes`, a fixed-size PDU (A-RELEASE, A-ABORT, A-ASSOCIATE-RJ) longer than
its 4 bytes, or an unknown type is answered with an A-ABORT and the connection is closed; no
buffer is ever sized by a length the peer declared before this check.

With `receive_workers` > 1 the node runs several receiver processes on one port
(service/receiver_process.py) and each has its own gate: the A-ASSOCIATE-RQ deadline, the PDU
checks and the backlog hold per connection as before; `max_connections_per_address` and
`max_associations` are counted per process, so across N processes one address holds at most
N x `max_connections_per_address` of N x `max_associations` slots: the same share, never all
of them (the kernel spreads one address's connections over the processes by their ports).

Every refusal is counted (service/metrics.py) and logged with the peer address, at most one
line per address and kind every `peer_log_interval_s`; the next line says how many were left out.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

import pynetdicom
from pynetdicom import transport
from pynetdicom.pdu import A_ASSOCIATE_RQ as A_ASSOCIATE_RQ_PDU
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from service import metrics
from service.config import Config
from service.pynetdicom_tuning import PUSHBACK_ATTR, serve_in_thread

LOG = logging.getLogger("befund.receive")

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
PDU_NAMES = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
             A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF", A_RELEASE_RQ: "A-RELEASE-RQ",
             A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT"}
FIXED_PDU_LENGTH = 4  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT (PS3.8 9.3.4, 9.3.6-9.3.8)
HEADER = struct.Struct(">BxL")  # PDU type, reserved, length of what follows

# A-ABORT source 2 (service provider) reasons, PS3.8 Table 9-26
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


ACCEPT_BURST = 256  # connections accepted per wake of the accept loop (then it serves a shutdown)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

SUPPORTED_PROTOCOL_VERSION = 0x0001
# A-ASSOCIATE-RJ: rejected permanent, by the service provider (ACSE), protocol version not supported
REJECT_PROTOCOL_VERSION = struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, 0x01, 0x02, 0x02)


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with `reason`."""
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, 0x02, reason)


class PeerLog:
    """Warnings about peers, at most one line per (address, kind) every `interval_s`.

    A host that opens a thousand bad connections a second must not fill the disk with the
    node's log; the line after a quiet interval says how many were left out.
    """

    MAX_ADDRESSES = 4096  # beyond this many recent (address, kind) pairs, all addresses share one

    def __init__(self, logger: logging.Logger, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last logged, left out since]
        self._lock = threading.Lock()

    def warning(self, address: str, kind: str, message: str, *args) -> None:
        with self._lock:
            now = self._clock()
            key = self._key(address, kind, now)
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self._interval:
                entry[1] += 1
                return
            left_out = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0]
        if left_out:
            message += " (%d more like it from %s in the last %.0f s not logged)"
            args = (*args, left_out, key[0], now - entry[0])
        self._logger.warning(message, *args)

    def _key(self, address: str, kind: str, now: float) -> tuple[str, str]:
        key = (address, kind)
        if key in self._seen or len(self._seen) < self.MAX_ADDRESSES:
            return key
        for old in [k for k, (last, _) in self._seen.items() if now - last >= self._interval]:
            del self._seen[old]
        return key if len(self._seen) < self.MAX_ADDRESSES else ("many addresses", kind)


class ConnectionGate:
    """The limits on unauthenticated connections and on PDU lengths, shared by the plain and
    the TLS server of one listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.peer_log = PeerLog(LOG, config.peer_log_interval_s)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- at accept ---------------------------------------------------------------------------
    def admit(self, address: str) -> bool:
        """Count a new connection from `address`; False (refuse it) when the address has
        `max_connections_per_address` open already."""
        limit = self.config.max_connections_per_address
        with self._lock:
            n = self._open.get(address, 0)
            if n < limit:
                self._open[address] = n + 1
                return True
        self.dropped(address, "per_address_limit",
                     "connection from %s refused: %d connections from this address are open "
                     "(max_connections_per_address)", address, limit)
        return False

    def release(self, address: str) -> None:
        """The connection from `address` admitted earlier has ended."""
        with self._lock:
            n = self._open.get(address, 0) - 1
            if n > 0:
                self._open[address] = n
            else:
                self._open.pop(address, None)

    # -- before the association --------------------------------------------------------------
    def read_associate_rq(self, sock: socket.socket, address: str) -> bytes | None:
        """The peer's first PDU, a whole A-ASSOCIATE-RQ, read under the request deadline and
        within `max_associate_rq_bytes`; None if the connection is to be closed (already
        answered with an A-ABORT where one is due, logged and counted)."""
        deadline = time.monotonic() + self.config.association_request_timeout_s
        closed = metrics.DICOM_CONNECTIONS_DROPPED.labels("closed_before_request")
        try:
            header = _recv_before(sock, HEADER.size, deadline)
            if header is None or header[0] == A_ABORT:
                closed.inc()
                return None
            pdu_type, length = HEADER.unpack(header)
            if pdu_type != A_ASSOCIATE_RQ or length > self.config.max_associate_rq_bytes:
                self._refuse_first_pdu(sock, address, pdu_type, length)
                return None
            body = _recv_before(sock, length, deadline)
        except TimeoutError:
            self.dropped(address, "request_timeout",
                         "connection from %s closed: no complete A-ASSOCIATE-RQ within %.1f s "
                         "(association_request_timeout_s)", address,
                         self.config.association_request_timeout_s)
            return None
        except OSError:  # reset by the peer
            body = None
        if body is None:
            closed.inc()
            return None
        request = header + body
        decoded = _decoded(request)
        if decoded is None:
            self.protocol_error(address, pdu_type, length, "malformed", "cannot be decoded")
            _send_quietly(sock, abort_pdu(ABORT_INVALID_PARAMETER))
            return None
        if decoded.protocol_version != SUPPORTED_PROTOCOL_VERSION:
            self.protocol_error(address, pdu_type, length, "unsupported_version",
                                f"protocol version {decoded.protocol_version} is not supported",
                                answer="rejected")
            _send_quietly(sock, REJECT_PROTOCOL_VERSION)
            return None
        return request

    def _refuse_first_pdu(self, sock: socket.socket, address: str, pdu_type: int, length: int) -> None:
        if pdu_type not in PDU_NAMES:
            self.protocol_error(address, pdu_type, length, "unknown_type", "unknown PDU type")
            reason = ABORT_UNRECOGNIZED_PDU
        elif pdu_type != A_ASSOCIATE_RQ:
            self.protocol_error(address, pdu_type, length, "unexpected",
                                "not an A-ASSOCIATE-RQ as the first PDU")
            reason = ABORT_UNEXPECTED_PDU
        else:
            self.protocol_error(address, pdu_type, length, "too_long",
                                f"longer than {self.config.max_associate_rq_bytes} (max_associate_rq_bytes)")
            reason = ABORT_INVALID_PARAMETER
        _send_quietly(sock, abort_pdu(reason))

    def handshake_failed(self, address: str, exc: Exception) -> None:
        reason = "no handshake before the timeout" if isinstance(exc, TimeoutError) else str(exc)[:200]
        self.dropped(address, "tls_handshake", "TLS connection from %s dropped: %s", address,
                     _printable(reason))

    def dropped(self, address: str, reason: str, message: str, *args) -> None:
        """Count and log (rate-limited) a connection closed before an association."""
        metrics.DICOM_CONNECTIONS_DROPPED.labels(reason).inc()
        self.peer_log.warning(address, reason, message, *args)

    def protocol_error(self, address: str, pdu_type: int, length: int, kind: str, what: str,
                       answer: str = "aborted") -> None:
        """Count and log (rate-limited) a PDU answered with an A-ABORT (or an A-ASSOCIATE-RJ)."""
        name = PDU_NAMES.get(pdu_type, "unknown")
        metrics.PROTOCOL_ERRORS.labels(name, kind).inc()
        self.peer_log.warning(address, f"protocol:{name}:{kind}",
                              "protocol error from %s: %s (type 0x%02X) declaring %d bytes: %s; %s",
                              address, name, pdu_type, length, what, answer)

    # -- inside the association --------------------------------------------------------------
    def max_pdu_length(self, pdu_type: int) -> int | None:
        """The longest body a PDU of `pdu_type` may declare; None for an unknown type."""
        if pdu_type == P_DATA_TF:
            return self.config.max_pdu
        if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
            return self.config.max_associate_rq_bytes
        if pdu_type in PDU_NAMES:
            return FIXED_PDU_LENGTH
        return None

    def guard(self, assoc) -> None:
        """Check every PDU header of the accepted association `assoc` before its body is read
        (wraps the DUL's `_read_pdu_data`, whatever reader is installed there), and turn an
        exception in its state machine into an orderly abort (wraps `do_action`)."""
        dul = assoc.dul
        address = _peer_address(assoc)
        dul._read_pdu_data = _GuardedReader(self, dul, dul._read_pdu_data, address)
        dul.state_machine.do_action = _GuardedStateMachine(self, dul, dul.state_machine.do_action, address)

    def unhandled(self, address: str, event: str, exc: Exception) -> None:
        """Count and log (rate-limited) what pynetdicom's state machine failed on."""
        name = _EVENT_PDU.get(event, "none")
        metrics.PROTOCOL_ERRORS.labels(name, "unhandled").inc()
        self.peer_log.warning(address, f"protocol:{name}:unhandled",
                              "protocol error from %s: pynetdicom could not handle %s (%s, %s); aborted",
                              address, name, event, type(exc).__name__)


class _GuardedReader:
    """Stands in for `DULServiceProvider._read_pdu_data` of one accepted association."""

    def __init__(self, gate: ConnectionGate, dul, read_pdu_data, address: str) -> None:
        self._gate = gate
        self._dul = dul
        self._read_pdu_data = read_pdu_data
        self._address = address

    def __call__(self) -> None:
        assoc_socket = self._dul.socket
        try:
            header = assoc_socket.recv(HEADER.size)  # pushed-back bytes first (_recv_exact)
        except OSError:
            self._dul.event_queue.put("Evt17")  # as pynetdicom does: transport connection closed
            return
        if len(header) == HEADER.size:
            pdu_type, length = HEADER.unpack(header)
            limit = self._gate.max_pdu_length(pdu_type)
            if limit is None or length > limit:
                self._abort(assoc_socket, pdu_type, length, limit)
                return
        setattr(assoc_socket, PUSHBACK_ATTR, bytes(header) + bytes(getattr(assoc_socket, PUSHBACK_ATTR, b"")))
        self._read_pdu_data()
        events = self._dul.event_queue.queue
        if len(header) == HEADER.size and events and events[-1] == "Evt19":  # pynetdicom could not decode it
            self._gate.protocol_error(self._address, pdu_type, length, "malformed", "cannot be decoded")

    def _abort(self, assoc_socket, pdu_type: int, length: int, limit: int | None) -> None:
        if limit is None:
            self._gate.protocol_error(self._address, pdu_type, length, "unknown_type", "unknown PDU type")
            reason = ABORT_UNRECOGNIZED_PDU
        else:
            what = (f"longer than the {limit} befund announced (max_pdu)" if pdu_type == P_DATA_TF
                    else f"longer than {limit}")
            self._gate.protocol_error(self._address, pdu_type, length, "too_long", what)
            reason = ABORT_INVALID_PARAMETER
        if assoc_socket.socket is not None:
            _send_quietly(assoc_socket.socket, abort_pdu(reason))
        # Evt17 (transport closed): pynetdicom issues the A-P-ABORT indication and ends the
        # association; nothing more is read from a peer that declared what it may not send.
        assoc_socket.close()


_EVENT_PDU = {"Evt3": "A-ASSOCIATE-AC", "Evt4": "A-ASSOCIATE-RJ", "Evt6": "A-ASSOCIATE-RQ",
              "Evt10": "P-DATA-TF", "Evt12": "A-RELEASE-RQ", "Evt13": "A-RELEASE-RP", "Evt16": "A-ABORT"}


class _GuardedStateMachine:
    """Stands in for `StateMachine.do_action` of one accepted association.

    pynetdicom's state machine raises out of the DUL thread on some malformed messages (a
    command set without CommandField) and on some event orders (a release answer after an
    abort): the thread dies with a traceback in the log, no A-ABORT is sent and the
    association's end is never reported. Here such an exception ends the association as an
    abort would: A-ABORT to the peer, A-P-ABORT to the association, the connection closed.
    """

    def __init__(self, gate: ConnectionGate, dul, do_action, address: str) -> None:
        self._gate = gate
        self._dul = dul
        self._do_action = do_action
        self._address = address

    def __call__(self, event: str) -> None:
        try:
            self._do_action(event)
        except Exception as exc:  # noqa: BLE001 - any failure ends the association, below
            self._gate.unhandled(self._address, event, exc)
            dul = self._dul
            dul.kill_dul()
            assoc_socket = dul.socket
            if assoc_socket is not None and assoc_socket.socket is not None:
                _send_quietly(assoc_socket.socket, abort_pdu(0x00))
                assoc_socket.close()
            primitive = A_P_ABORT()
            primitive.provider_reason = 0x00
            dul.to_user_queue.put(primitive)


class _PushbackSocket(transport.AssociationSocket):
    """The AssociationSocket of a gated connection: ready while the A-ASSOCIATE-RQ read by the
    gate waits pushed back in front of it (the DUL reads only when its socket is ready)."""

    @property
    def ready(self) -> bool:
        return bool(getattr(self, PUSHBACK_ATTR, None)) or transport.AssociationSocket.ready.fget(self)


class _GatedRequestHandler(RequestHandler):
    """pynetdicom's handler for a connection whose A-ASSOCIATE-RQ the gate has read: the bytes
    go back in front of the socket, and the handler lives as long as the association (so
    that the server knows when the connection has ended)."""

    def __init__(self, request, client_address, server, associate_rq: bytes) -> None:
        self._associate_rq = associate_rq
        self._assoc = None
        super().__init__(request, client_address, server)

    def _create_association(self):
        assoc = super()._create_association()
        assoc_socket = assoc.dul.socket
        assoc_socket.__class__ = _PushbackSocket
        setattr(assoc_socket, PUSHBACK_ATTR, self._associate_rq)
        self._assoc = assoc
        return assoc

    def handle(self) -> None:
        super().handle()
        if self._assoc is not None:
            self._assoc.join()


class GatedAssociationServer(ThreadedAssociationServer):
    """An association server (plain or TLS) that hands a connection to pynetdicom only after
    its whole A-ASSOCIATE-RQ has arrived in time, and caps connections per address.

    Accepting does no I/O (no TLS handshake, no read): everything a peer can stall runs in
    the connection's own thread under a deadline, so a silent client never delays others.
    """

    daemon_threads = True  # a connection still in the gate never holds up shutdown

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 gate: ConnectionGate, reuse_port: bool = False) -> None:
        self.gate = gate
        self.reuse_port = reuse_port
        self.request_queue_size = gate.config.listen_backlog  # read by server_activate (listen)
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers)

    def server_bind(self) -> None:
        """With `reuse_port`, this process shares the port with the node's other receiver
        processes (SO_REUSEPORT: the kernel spreads new connections over them; only sockets of
        the same user can join)."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)  # accept until the queue is empty: _handle_request_noblock

    def get_request(self):
        request, client_address = self.socket.accept()  # plain socket: no handshake here
        request.setblocking(True)  # as socketserver hands it over; the gate sets its deadlines
        return request, client_address

    def verify_request(self, request, client_address) -> bool:
        return self.gate.admit(client_address[0])

    def _handle_request_noblock(self) -> None:
        """Accept every queued connection (at most ACCEPT_BURST per wake), not one per wake of
        the serve loop as socketserver does: see the module docstring for why."""
        for _ in range(ACCEPT_BURST):
            try:
                request, client_address = self.get_request()
            except OSError:  # BlockingIOError: the queue is empty; others: socketserver's way
                return
            if not self.verify_request(request, client_address):
                _reset(request)
                continue
            try:
                self.process_request(request, client_address)
            except Exception:  # noqa: BLE001 - as socketserver does: report it, close, keep serving
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.gate.release(client_address[0])
            raise

    def process_request_thread(self, request, client_address) -> None:
        address = client_address[0]
        try:
            sock = self._handshake(request, address) if self.ssl_context else request
            associate_rq = self.gate.read_associate_rq(sock, address) if sock is not None else None
            if associate_rq is None:
                self.shutdown_request(sock if sock is not None else request)
                return
            sock.settimeout(None)  # as accepted; the listener sets the association's own timeout
            _GatedRequestHandler(sock, client_address, self, associate_rq)
        except Exception:  # noqa: BLE001 - as socketserver does: report it, close, keep serving
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self.gate.release(address)

    def _handshake(self, request: socket.socket, address: str):
        try:
            request.settimeout(self.gate.config.tls.handshake_timeout_s)
            return self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
            self.gate.handshake_failed(address, exc)
            return None


def start_server(ae: pynetdicom.AE, address, evt_handlers, gate: ConnectionGate, ssl_context=None,
                 name: str = "dicom-accept", reuse_port: bool = False) -> GatedAssociationServer:
    """Like `ae.start_server(address, block=False, ...)`, through the gate."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GatedAssociationServer, gate=gate, reuse_port=reuse_port)
    serve_in_thread(ae, server, name)
    return server


def _recv_before(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Exactly `n` bytes (n is already bounded) before `deadline`; None if the peer closed
    first. Raises TimeoutError at the deadline, however slowly the bytes trickle in."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    view.release()
    return bytes(buf)


def _decoded(request: bytes) -> A_ASSOCIATE_RQ_PDU | None:
    """`request` as pynetdicom decodes it, None if it cannot be turned into an A-ASSOCIATE
    indication. Such a request, or one of an unsupported protocol version, would leave its
    association waiting for the indication until `acse_timeout`, holding a slot of
    `max_associations` after the connection has gone."""
    try:
        pdu = A_ASSOCIATE_RQ_PDU()
        pdu.decode(request)
        pdu.to_primitive()
    except Exception:  # noqa: BLE001 - whatever pynetdicom's decoder raises, the request is refused
        return None
    return pdu


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset: no FIN exchange and no TIME_WAIT entry on the node for
    each of the many connections a flooding host has refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)  # a peer that reads nothing must not hold the thread
        sock.sendall(data)
    except (OSError, ValueError):
        pass


def _peer_address(assoc) -> str:
    try:
        return str(assoc.requestor.address)
    except (ValueError, AttributeError):
        return "?"


def _printable(text: str) -> str:
    """Peer-influenced text (a TLS error) for a log line: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
