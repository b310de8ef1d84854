"""The listener's door against hostile peers, unit level: the in-process DicomListener over real
sockets (raw PDUs from tests/raw_dicom.py, DCMTK echoscu as the well-behaved peer).

tests/test_hostile_peers.py proves the same points against the real node.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY
from pynetdicom import ALL_TRANSFER_SYNTAXES

from service import pynetdicom_tuning
from service.config import Config, ConfigError, TlsConfig, load_config
from service.connection_gate import PeerLog
from service.dicom_listener import DicomListener
from service.spool import Spool
from tests import raw_dicom as raw
from tests.dicom_peers import have_dcmtk, run_echoscu
from tests.test_dicom_listener import Recorder, wait_until
from tests.tls_certs import have_openssl, make_tls_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK echoscu not installed")

ATTACKER = "127.0.0.2"  # loopback answers on all of 127/8: the attacker is another peer address
ABORT_INVALID_PARAMETER, ABORT_UNEXPECTED_PDU, ABORT_UNRECOGNIZED_PDU = (2, 6), (2, 2), (2, 1)
MEMORY_BOUND = 32 * 1024 * 1024  # what a refused PDU may cost the receiving process, at most


@pytest.fixture
def listener(tmp_path, caplog):
    """Start a listener with config overrides; yields a factory, stops everything after."""
    started = []
    caplog.set_level(logging.INFO, logger="befund")

    def start(**overrides) -> tuple[DicomListener, Recorder]:
        cfg = replace(Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(tmp_path / "var")),
                      **overrides)
        recorder = Recorder()
        lst = DicomListener(cfg, Spool(cfg.spool_path, 0), recorder.on_instance, recorder.on_association_end)
        lst.start()
        started.append(lst)
        return lst, recorder

    yield start
    for lst in started:
        lst.stop()


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def protocol_errors(pdu: str, kind: str) -> float:
    return counter("befund_protocol_errors_total", pdu=pdu, kind=kind)


def dropped(reason: str) -> float:
    return counter("befund_dicom_connections_dropped_total", reason=reason)


class PeakMemory:
    """Peak Python allocation while the block runs (tracemalloc)."""

    def __enter__(self):
        tracemalloc.start()
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_associate_rq_declaring_4_gib_is_aborted_without_allocating_it(listener, caplog):
    lst, _ = listener()
    # The largest conforming request passes: 128 presentation contexts (the most PS3.8 allows),
    # each offering every transfer syntax pynetdicom knows, ~157 KB (the bound is 256 KiB).
    everything = tuple((2 * i + 1, raw.VERIFICATION, tuple(ALL_TRANSFER_SYNTAXES)) for i in range(128))
    request = raw.associate_rq(contexts=everything)
    assert 150_000 < len(request) < 256 * 1024
    with raw.connect(lst.port, ATTACKER) as sock:
        sock.sendall(request)
        assert raw.read_pdu(sock)[0] == raw.A_ASSOCIATE_AC
    before = protocol_errors("A-ASSOCIATE-RQ", "too_long")
    with PeakMemory() as memory, raw.connect(lst.port, ATTACKER) as sock:
        sock.sendall(raw.pdu(raw.A_ASSOCIATE_RQ, b"\x00" * 64, declared_length=0xFFFFFFFF))
        assert raw.abort_reason(raw.read_pdu(sock)) == ABORT_INVALID_PARAMETER
        assert raw.read_pdu(sock) is None  # and the node closed the connection
    assert memory.peak < MEMORY_BOUND, f"{memory.peak / 1e6:.0f} MB allocated for a refused request"
    assert protocol_errors("A-ASSOCIATE-RQ", "too_long") == before + 1
    assert (f"protocol error from {ATTACKER}: A-ASSOCIATE-RQ (type 0x01) declaring 4294967295 bytes"
            in caplog.text)
    assert run_echoscu(port=lst.port).returncode == 0


def test_p_data_longer_than_the_announced_max_pdu_is_aborted_and_the_association_ends(listener, caplog):
    lst, rec = listener(max_pdu=16384)
    before = protocol_errors("P-DATA-TF", "too_long")
    with PeakMemory() as memory, raw.associate(lst.port, ATTACKER) as sock:
        sock.sendall(raw.p_data(1, raw.echo_rq_command()))  # within max_pdu: answered
        assert raw.read_pdu(sock)[0] == raw.P_DATA_TF
        sock.sendall(raw.pdu(raw.P_DATA_TF, b"\x00" * 64, declared_length=0x7FFFFFF0))
        assert raw.abort_reason(raw.read_pdu(sock)) == ABORT_INVALID_PARAMETER
        assert raw.read_pdu(sock) is None
    assert memory.peak < MEMORY_BOUND, f"{memory.peak / 1e6:.0f} MB allocated for a refused P-DATA-TF"
    assert protocol_errors("P-DATA-TF", "too_long") == before + 1
    assert (f"protocol error from {ATTACKER}: P-DATA-TF (type 0x04) declaring 2147483632 bytes: "
            "longer than the 16384 befund announced (max_pdu)") in caplog.text
    wait_until(lambda: len(rec.ends) == 1)  # the association's end is reported as for any abort


@pytest.mark.parametrize("name,sent,reason,metric", [
    ("A-RELEASE-RQ", raw.pdu(raw.A_RELEASE_RQ, b"\x00" * 4, declared_length=1 << 30),
     ABORT_INVALID_PARAMETER, ("A-RELEASE-RQ", "too_long")),
    ("A-ABORT", raw.pdu(raw.A_ABORT, b"\x00" * 4, declared_length=1 << 30),
     ABORT_INVALID_PARAMETER, ("A-ABORT", "too_long")),
    ("A-ASSOCIATE-RQ again", raw.pdu(raw.A_ASSOCIATE_RQ, b"\x00" * 4, declared_length=1 << 30),
     ABORT_INVALID_PARAMETER, ("A-ASSOCIATE-RQ", "too_long")),
    ("unknown type 0x09", raw.pdu(0x09, b"\x00" * 8), ABORT_UNRECOGNIZED_PDU, ("unknown", "unknown_type")),
])
def test_other_pdus_in_an_association_are_bounded_too(listener, name, sent, reason, metric):
    lst, _ = listener()
    before = protocol_errors(*metric)
    with PeakMemory() as memory, raw.associate(lst.port, ATTACKER) as sock:
        sock.sendall(sent)
        assert raw.abort_reason(raw.read_pdu(sock)) == reason, name
    assert memory.peak < MEMORY_BOUND
    assert protocol_errors(*metric) == before + 1


@pytest.mark.parametrize("first,reason,metric", [
    (raw.p_data(1, raw.echo_rq_command()), ABORT_UNEXPECTED_PDU, ("P-DATA-TF", "unexpected")),
    (raw.pdu(0x7F, b"x" * 10), ABORT_UNRECOGNIZED_PDU, ("unknown", "unknown_type")),
])
def test_a_first_pdu_that_is_not_an_associate_rq_is_aborted(listener, first, reason, metric):
    lst, _ = listener()
    before = protocol_errors(*metric)
    with raw.connect(lst.port, ATTACKER) as sock:
        sock.sendall(first)
        assert raw.abort_reason(raw.read_pdu(sock)) == reason
    assert protocol_errors(*metric) == before + 1


def test_requests_pynetdicom_would_not_answer_hold_no_association_slot(listener, caplog):
    lst, _ = listener(max_associations=2)
    garbage = raw.pdu(raw.A_ASSOCIATE_RQ, b"\x00\x01\x00\x00" + b"\xee" * 200)  # items that do not parse
    version_2 = bytearray(raw.associate_rq())
    version_2[6:8] = b"\x00\x02"
    before = protocol_errors("A-ASSOCIATE-RQ", "malformed")
    for _ in range(3):
        with raw.connect(lst.port, ATTACKER) as sock:
            sock.sendall(garbage)
            assert raw.abort_reason(raw.read_pdu(sock)) == ABORT_INVALID_PARAMETER
        with raw.connect(lst.port, ATTACKER) as sock:
            sock.sendall(bytes(version_2))
            assert raw.read_pdu(sock) == (raw.A_ASSOCIATE_RJ, b"\x00\x01\x02\x02")  # protocol version
    assert protocol_errors("A-ASSOCIATE-RQ", "malformed") == before + 3
    result = run_echoscu(port=lst.port, timeout=20)  # no slot is left held by the six
    assert result.returncode == 0, result.output
    assert "Traceback" not in caplog.text


def test_a_message_pynetdicom_fails_on_ends_the_association_as_an_abort(listener, caplog):
    lst, rec = listener()
    uid = raw.VERIFICATION.encode() + b"\x00"
    no_command_field = struct.pack("<HHLL", 0, 0, 4, 8 + len(uid)) + struct.pack("<HHL", 0, 2, len(uid)) + uid
    before = protocol_errors("P-DATA-TF", "unhandled")
    for _ in range(3):
        with raw.associate(lst.port, ATTACKER) as sock:
            sock.sendall(raw.p_data(1, no_command_field))
            assert raw.abort_reason(raw.read_pdu(sock)) == (2, 0)
            assert raw.read_pdu(sock) is None
    wait_until(lambda: len(rec.ends) == 3)  # each end reported, as for any abort
    assert protocol_errors("P-DATA-TF", "unhandled") == before + 3
    lines = [r.getMessage() for r in caplog.records if "could not handle" in r.getMessage()]
    assert lines == [f"protocol error from {ATTACKER}: pynetdicom could not handle P-DATA-TF "
                     "(Evt10, AttributeError); aborted"]  # the other two within the log interval
    assert "Traceback" not in caplog.text


def test_silent_connections_take_no_association_slot(listener):
    lst, _ = listener(max_associations=2, association_request_timeout_s=30.0)
    silent = [raw.connect(lst.port, ATTACKER) for _ in range(10)]
    try:
        for _ in range(3):
            result = run_echoscu(port=lst.port, timeout=20)
            assert result.returncode == 0, result.output
    finally:
        for s in silent:
            s.close()


def test_a_connection_without_a_whole_request_in_time_is_closed_and_logged(listener, caplog):
    lst, _ = listener(association_request_timeout_s=1.0)
    before = dropped("request_timeout")
    request = raw.associate_rq()
    with raw.connect(lst.port, ATTACKER) as silent, raw.connect(lst.port, "127.0.0.3") as trickle:
        started = time.monotonic()
        closed = threading.Event()

        def drip():  # one byte every 0.2 s: each arrives well within any per-read timeout
            try:
                for byte in request:
                    trickle.sendall(bytes([byte]))
                    if closed.wait(0.2):
                        return
            except OSError:
                return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        assert raw.read_pdu(silent, timeout=10) is None
        assert raw.read_pdu(trickle, timeout=10) is None
        closed.set()
        assert time.monotonic() - started < 8.0  # the reads' own timeout (10 s) would be later
    assert dropped("request_timeout") == before + 2
    assert f"connection from {ATTACKER} closed: no complete A-ASSOCIATE-RQ within 1.0 s" in caplog.text
    assert "connection from 127.0.0.3 closed: no complete A-ASSOCIATE-RQ within 1.0 s" in caplog.text


def test_connections_per_address_are_capped_and_refusals_logged_once_per_interval(listener, caplog):
    lst, _ = listener(max_connections_per_address=3, association_request_timeout_s=30.0)
    before = dropped("per_address_limit")
    held = [raw.connect(lst.port, ATTACKER) for _ in range(3)]  # accepted in order, before the rest
    try:
        for _ in range(7):
            assert refused_at_once(lst.port, ATTACKER)
        assert run_echoscu(port=lst.port).returncode == 0  # another address is not affected
    finally:
        for s in held:
            s.close()
    assert dropped("per_address_limit") == before + 7
    lines = [r.getMessage() for r in caplog.records if "refused: 3 connections" in r.getMessage()]
    assert lines == [f"connection from {ATTACKER} refused: 3 connections from this address are open "
                     "(max_connections_per_address)"]
    wait_until(lambda: associates(lst.port, ATTACKER))  # closed connections give their place back


def refused_at_once(port: int, source: str) -> bool:
    """True if the node closes a new connection from `source` before any PDU: with a reset,
    which may already end the connect() itself."""
    try:
        with raw.connect(port, source) as sock:
            return raw.read_pdu(sock, timeout=5) is None
    except ConnectionResetError:
        return True


def associates(port: int, source: str) -> bool:
    """True if `source` gets an association (and releases it)."""
    try:
        with raw.associate(port, source) as sock:
            sock.sendall(raw.RELEASE_RQ)
            return raw.read_pdu(sock)[0] == raw.A_RELEASE_RP
    except (AssertionError, OSError):
        return False


def test_the_listen_backlog_fits_a_burst_of_associations(listener):
    lst, _ = listener()
    out = subprocess.run(["ss", "-ltnH", f"sport = :{lst.port}"], capture_output=True, text=True,
                         timeout=10).stdout.split()
    assert int(out[2]) == 1024  # ss shows a listening socket's backlog as Send-Q


@pytest.mark.skipif(not have_openssl(), reason="needs openssl")
def test_tls_connections_go_through_the_same_gate(listener, tmp_path, caplog):
    certs = make_tls_files(tmp_path / "certs")
    lst, _ = listener(association_request_timeout_s=1.0, tls=TlsConfig(
        enabled=True, port=0, cert=str(certs.server_cert), key=str(certs.server_key)))
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    context.check_hostname = False
    with raw.connect(lst.tls_port, ATTACKER) as plain, context.wrap_socket(plain) as tls:
        assert raw.read_pdu(tls, timeout=10) is None  # handshake done, then silent: closed
    assert f"connection from {ATTACKER} closed: no complete A-ASSOCIATE-RQ within 1.0 s" in caplog.text
    with raw.connect(lst.tls_port, ATTACKER) as plain, context.wrap_socket(plain) as tls:
        tls.sendall(raw.pdu(raw.A_ASSOCIATE_RQ, b"", declared_length=0xFFFFFFFF))
        assert raw.abort_reason(raw.read_pdu(tls)) == ABORT_INVALID_PARAMETER


def test_peer_log_writes_one_line_per_address_and_kind_per_interval(caplog):
    now = [0.0]
    log = PeerLog(logging.getLogger("befund.test"), 10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="befund.test")
    for _ in range(5):
        log.warning("10.0.0.9", "refused", "refused %s", "10.0.0.9")
    log.warning("10.0.0.8", "refused", "refused %s", "10.0.0.8")
    log.warning("10.0.0.9", "timeout", "timeout %s", "10.0.0.9")
    now[0] = 11.0
    log.warning("10.0.0.9", "refused", "refused %s", "10.0.0.9")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 10.0.0.9", "refused 10.0.0.8", "timeout 10.0.0.9",
        "refused 10.0.0.9 (4 more like it from 10.0.0.9 in the last 11 s not logged)"]


class _Socketish:
    """What `_recv_exact` needs of pynetdicom's AssociationSocket: a `socket`."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_recv_exact_allocates_only_what_arrives():
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(b"x" * 1000)
        peer.close()
        with PeakMemory() as memory:
            got = pynetdicom_tuning._recv_exact(_Socketish(ours), 512 * 1024 * 1024)
        assert got == b"x" * 1000
        assert memory.peak < MEMORY_BOUND, f"{memory.peak / 1e6:.0f} MB for 1000 bytes received"
    # and a long PDU that does arrive is read whole, pushed-back bytes first
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * (160 * 1024)  # 40 MiB: past the preallocation, so it grows
    holder = _Socketish(ours)
    setattr(holder, pynetdicom_tuning.PUSHBACK_ATTR, payload[:6])
    sender = threading.Thread(target=lambda: (peer.sendall(payload[6:]), peer.close()), daemon=True)
    sender.start()
    with ours:
        assert pynetdicom_tuning._recv_exact(holder, len(payload)) == payload
    sender.join(10)


@pytest.mark.parametrize("key", ["max_pdu", "max_associate_rq_bytes", "max_connections_per_address",
                                 "listen_backlog", "association_request_timeout_s"])
def test_a_zero_network_limit_is_refused_at_start(tmp_path, key):
    path = tmp_path / "befund.yaml"
    path.write_text(f"{key}: 0\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path, env={})
