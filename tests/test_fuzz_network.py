"""A bounded network-level fuzz of the running node: random and mutated A-ASSOCIATE-RQ,
P-DATA-TF and A-RELEASE-RQ PDUs over raw sockets against `befund serve`.

For every case: whatever the node sends back is a sequence of well-formed PDUs of known types
(never longer than 1 MiB), a first PDU declaring more than the limits is answered with an
A-ABORT, and the node closes the connection within a deadline once the fuzzer stops sending.
After every batch of cases, and at the end: the gateway's RSS has grown by less than 50 MB and
a well-behaved sender (pynetdicom, from another address) gets its C-ECHO and C-STORE through.

`BEFUND_NET_FUZZ_EXAMPLES` sets the number of examples per test (README: Fuzzing).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import raw_dicom as raw
from tests.dicom_peers import have_dcmtk
from tests.node_harness import RunningNode, rss_bytes
from tests.test_dicom_listener import make_ct

pytestmark = [pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

EXAMPLES = int(os.environ.get("BEFUND_NET_FUZZ_EXAMPLES", "60"))
BATCH = 25  # cases between two checks of the node's memory and of the good sender
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
ANSWER_WAIT_S = 0.3  # for the node's first answer, before the fuzzer closes its side
CLOSE_DEADLINE_S = 15.0  # the node's request deadline is 5 s; it closes at once on EOF
MAX_ASSOCIATE_RQ, MAX_PDU = 256 * 1024, 262144  # the node's defaults
KNOWN_ANSWERS = {raw.A_ASSOCIATE_AC, raw.A_ASSOCIATE_RJ, raw.P_DATA_TF, raw.A_RELEASE_RP, raw.A_ABORT}


class Target:
    """The node under fuzz, what it was before, and how many cases it has taken."""

    def __init__(self, node: RunningNode, directory) -> None:
        self.node = node
        self.directory = directory
        self.pid = node.listener_pid()
        self.good_sends = 0
        # Warm-up before the baseline: the first study's job (a tiny CT, "not analysed": it is
        # not cross-sectional) loads the SR encoder into the gateway, ~90 MB once.
        node.wait_study_state(self.check_good_sender(), {"not analysed"}, timeout=120)
        self.rss_before = rss_bytes(self.pid)
        self.cases = 0
        self.answers: dict[str, int] = {}

    def source(self) -> str:
        """A different 127.0.x.y for each case: the per-address cap is not what is fuzzed here."""
        return f"127.0.{2 + self.cases // 250 % 200}.{1 + self.cases % 250}"

    def run(self, chunks: list[bytes], associate_first: bool = False) -> None:
        first = chunks[0] if chunks else b""
        with raw.connect(self.node.dicom_port, self.source()) as sock:
            if associate_first:
                sock.sendall(raw.associate_rq(contexts=((1, raw.VERIFICATION, (raw.IMPLICIT_VR_LE,)),
                                                        (3, CTImageStorage, (ExplicitVRLittleEndian,)))))
                answer = raw.read_pdu(sock, timeout=CLOSE_DEADLINE_S)
                assert answer is not None and answer[0] == raw.A_ASSOCIATE_AC, answer
            for chunk in chunks:
                try:
                    sock.sendall(chunk)
                except OSError:
                    break  # the node has closed: what it sent is read below
            answers = []
            if select.select([sock], [], [], ANSWER_WAIT_S)[0]:  # the node answers before our EOF
                answer = raw.read_pdu(sock, timeout=CLOSE_DEADLINE_S)
                answers += [answer[0]] if answer else []
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answers += self._answers(sock)
        if len(first) >= 6 and _over_limit(first, associate_first):
            assert answers and answers[0] == raw.A_ABORT, f"over-long first PDU answered with {answers}"
        for kind in answers or ["closed"]:
            name = {raw.A_ASSOCIATE_AC: "AC", raw.A_ASSOCIATE_RJ: "RJ", raw.P_DATA_TF: "P-DATA",
                    raw.A_RELEASE_RP: "RP", raw.A_ABORT: "ABORT"}.get(kind, kind)
            self.answers[name] = self.answers.get(name, 0) + 1
        self.cases += 1
        if self.cases % BATCH == 0:
            self.check()

    def _answers(self, sock: socket.socket) -> list[int]:
        """Every PDU type the node sends until it closes; fails if it does not close in time."""
        end = time.monotonic() + CLOSE_DEADLINE_S
        types = []
        while True:
            assert time.monotonic() < end, f"the node kept the connection open; sent {types}"
            answer = raw.read_pdu(sock, timeout=max(0.1, end - time.monotonic()))
            if answer is None:
                return types
            assert answer[0] in KNOWN_ANSWERS, f"the node sent PDU type 0x{answer[0]:02X}"
            types.append(answer[0])

    def check(self) -> None:
        growth = rss_bytes(self.pid) - self.rss_before
        assert growth < RSS_GROWTH_LIMIT, f"the gateway grew by {growth / 1e6:.0f} MB in {self.cases} cases"
        self.check_good_sender()

    def check_good_sender(self) -> str:
        """C-ECHO and C-STORE from 127.0.0.1 succeed; the stored instance's study UID."""
        ae = AE(ae_title="GOODSCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.node.dicom_port, ae_title="BEFUND")
        assert assoc.is_established, "the good sender got no association"
        try:
            assert assoc.send_c_echo().Status == 0x0000
            study = generate_uid()
            path = make_ct(self.directory / f"good{self.good_sends}.dcm", study=study, rows=8, cols=8,
                           seed=self.good_sends)
            assert assoc.send_c_store(path).Status == 0x0000
            self.good_sends += 1
            return study
        finally:
            assoc.release()


def _over_limit(first: bytes, in_association: bool) -> bool:
    pdu_type, length = struct.unpack(">BxL", first[:6])
    if pdu_type == raw.P_DATA_TF:
        return in_association and length > MAX_PDU
    if pdu_type in (raw.A_ASSOCIATE_RQ, raw.A_ASSOCIATE_AC):
        return length > MAX_ASSOCIATE_RQ
    return False


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with RunningNode(tmp_path_factory.mktemp("fuzz-node")) as node:
        t = Target(node, tmp_path_factory.mktemp("good-sender"))
        yield t
        t.check()
        log = node.log_path.read_text(errors="replace")
        assert "Traceback" not in log, "a peer made the node log a traceback"
        print(f"\nnetwork fuzz: {t.cases} cases, {t.good_sends} good C-STOREs, answers {t.answers}, "
              f"gateway RSS growth {(rss_bytes(t.pid) - t.rss_before) / 1e6:.1f} MB")


# -- strategies ---------------------------------------------------------------------------------
lengths = st.one_of(st.integers(0, 600), st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 4, 6, 0xFFFF, MAX_PDU, MAX_PDU + 1, MAX_ASSOCIATE_RQ + 1,
                                     0x7FFFFFF0, 0xFFFFFFFF]))
pdu_types = st.one_of(st.integers(1, 7), st.integers(0, 255))


@st.composite
def random_pdu(draw) -> bytes:
    body = draw(st.binary(max_size=600))
    declared = draw(st.one_of(st.just(len(body)), lengths))
    return raw.pdu(draw(pdu_types), body, declared_length=declared)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("length"), st.just(2), lengths.map(lambda n: struct.pack(">L", n))),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, what in mutations:
        at = where % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= what
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = what
        elif kind in ("overwrite", "length"):
            at = where if kind == "length" else at
            out[at:at + len(what)] = what
    return bytes(out)


def store_rq_pdus(sop_uid: str) -> list[bytes]:
    """A C-STORE-RQ on context 3 as a command PDU and two data fragments (a tiny data set)."""
    def element(tag: int, raw_value: bytes) -> bytes:
        return struct.pack("<HHL", 0, tag, len(raw_value)) + raw_value
    sop_class = CTImageStorage.encode() + b"\x00" * (len(CTImageStorage) % 2)
    sop = sop_uid.encode() + b"\x00" * (len(sop_uid) % 2)
    body = (element(0x0002, sop_class) + element(0x0100, struct.pack("<H", 0x0001))
            + element(0x0110, struct.pack("<H", 7)) + element(0x0700, struct.pack("<H", 0))
            + element(0x0800, struct.pack("<H", 0x0000)) + element(0x1000, sop))
    command = element(0x0000, struct.pack("<L", len(body))) + body
    data = b"\x08\x00\x16\x00UI" + struct.pack("<H", len(sop_class)) + sop_class
    return [raw.p_data(3, command), raw.p_data(3, data[:6], control=0x00),
            raw.p_data(3, data[6:], control=0x02)]


in_association = st.one_of(
    st.just(raw.p_data(1, raw.echo_rq_command())),
    st.just(raw.RELEASE_RQ),
    st.sampled_from(store_rq_pdus(generate_uid())),
    random_pdu(),
)


# -- the fuzz -----------------------------------------------------------------------------------
@FUZZ
@given(pdus=st.lists(random_pdu(), min_size=1, max_size=3))
def test_random_pdus_before_an_association_are_refused_cleanly(target, pdus):
    target.run(pdus)


@FUZZ
@given(mutations=st.lists(mutation, max_size=5), called=st.sampled_from(["BEFUND", "OTHER"]),
       extra=st.lists(random_pdu(), max_size=2))
def test_mutated_association_requests_are_answered_or_refused_cleanly(target, mutations, called, extra):
    request = raw.associate_rq(called=called, contexts=(
        (1, raw.VERIFICATION, (raw.IMPLICIT_VR_LE,)), (3, CTImageStorage, (ExplicitVRLittleEndian,))))
    target.run([mutate(request, mutations), *extra])


@FUZZ
@given(pdus=st.lists(st.tuples(in_association, st.lists(mutation, max_size=3)), min_size=1, max_size=4))
def test_mutated_p_data_and_release_in_an_association_are_handled_cleanly(target, pdus):
    target.run([mutate(pdu, mutations) for pdu, mutations in pdus], associate_first=True)
