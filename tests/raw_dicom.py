"""DICOM upper-layer PDUs by hand, for tests that must send what no well-behaved peer sends.

Encodings follow PS3.8 section 9.3 (PDU structure) and PS3.7 (the C-ECHO command set); the
encoders are small on purpose, so a test can change any byte of what they return.
"""

from __future__ import annotations

import socket
import struct
import time

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
MAX_TEST_PDU = 1 << 20  # what these helpers read back; the node never sends more


def pdu(pdu_type: int, body: bytes, declared_length: int | None = None) -> bytes:
    length = len(body) if declared_length is None else declared_length
    return struct.pack(">BBL", pdu_type, 0, length) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


ECHO_CONTEXT = ((1, VERIFICATION, (IMPLICIT_VR_LE,)),)


def associate_rq(called: str = "BEFUND", calling: str = "RAWSCU",
                 contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = ECHO_CONTEXT,
                 max_length: int = 16384) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU."""
    body = struct.pack(">HH16s16s32s", 1, 0, called.encode().ljust(16), calling.encode().ljust(16), b"")
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def _element(group: int, element: int, raw: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(raw)) + raw


def echo_rq_command(message_id: int = 1) -> bytes:
    """The C-ECHO-RQ command set, implicit VR little endian."""
    uid = VERIFICATION.encode() + (b"\x00" if len(VERIFICATION) % 2 else b"")
    body = (_element(0, 0x0002, uid) + _element(0, 0x0100, struct.pack("<H", 0x0030))
            + _element(0, 0x0110, struct.pack("<H", message_id))
            + _element(0, 0x0800, struct.pack("<H", 0x0101)))
    return _element(0, 0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, fragment: bytes, control: int = 0x03) -> bytes:
    """A P-DATA-TF PDU with one PDV (control 0x03: the last fragment of a command)."""
    return pdu(P_DATA_TF, struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment)


RELEASE_RQ = pdu(A_RELEASE_RQ, b"\x00" * 4)


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the node from `source` (any 127.x.y.z address works on loopback)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU the node sends (type, body); None if it closed the connection first."""
    end = time.monotonic() + timeout
    header = _read(sock, 6, end)
    if header is None:
        return None
    pdu_type, length = struct.unpack(">BxL", header)
    assert length <= MAX_TEST_PDU, f"the node sent a PDU declaring {length} bytes"
    body = _read(sock, length, end)
    return None if body is None else (pdu_type, body)


def _read(sock: socket.socket, n: int, end: float) -> bytes | None:
    data = b""
    while len(data) < n:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def associate(port: int, source: str = "127.0.0.1", **kwargs) -> socket.socket:
    """A connection with an established association (raises if the node does not accept)."""
    sock = connect(port, source)
    sock.sendall(associate_rq(**kwargs))
    answer = read_pdu(sock)
    if answer is None or answer[0] != A_ASSOCIATE_AC:
        sock.close()
        raise AssertionError(f"association not accepted: {answer!r}")
    return sock


def abort_reason(answer: tuple[int, bytes] | None) -> tuple[int, int] | None:
    """(source, reason) of an A-ABORT answer, else None."""
    if answer is None or answer[0] != A_ABORT or len(answer[1]) != 4:
        return None
    return answer[1][2], answer[1][3]
