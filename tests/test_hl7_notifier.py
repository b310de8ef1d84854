"""The RIS gets a well-formed ORU^R01 over MLLP; failures raise DeliveryError so the outbox retries.

The receiving end is a real MLLP server from the maintained `hl7` library (asyncio, run in a
thread with its own loop); the webhook end is a real `http.server` in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import hl7.mllp
import pytest

from service.delivery_errors import DeliveryError
from service.hl7_notifier import build_oru_r01, escape, send_mllp
from service.webhook import post_json

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
STUDY = {
    "study_uid": "1.2.826.0.1.3680043.8.498.1",
    "patient_name": "Doe^Jane^^Dr",
    "patient_id": "PID|42^x",
    "accession": "ACC0001",
    "modality": "CT",
}
ICH = {"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"}
POSITIVE = {"id": 7, "model": "ich-ct", "model_version": "1.0.0", "present": True, "certainty": 0.934,
            "reason": "", "finding": ICH}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MllpListener:
    """An hl7.mllp server in its own thread and event loop; keeps what it received."""

    def __init__(self, port: int, ack_code: str = "AA") -> None:
        self.port = port
        self.ack_code = ack_code
        self.messages: list[hl7.Message] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    async def _handle(self, reader, writer) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(message)
                writer.writemessage(message.create_ack(self.ack_code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def _start(self):
        return await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port, encoding="utf-8")

    def __enter__(self) -> MllpListener:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def test_positive_finding_arrives_as_parsable_oru_r01():
    message = build_oru_r01(STUDY, POSITIVE, sending_facility="RADIOLOGY", receiving_application="RIS",
                            control_id="BEF0001", now=NOW)
    with MllpListener(free_port()) as listener:
        ack = send_mllp("127.0.0.1", listener.port, message, timeout=5)
    assert "MSA|AA|BEF0001" in ack
    [got] = listener.messages
    assert str(got.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(got.segment("MSH")[12]) == "2.5"
    assert str(got.segment("MSH")[4]) == "RADIOLOGY"
    assert str(got.segment("MSH")[18]) == "UNICODE UTF-8"
    pid = got.segment("PID")
    assert got.unescape(str(pid[3][0][0])) == "PID|42^x"  # delimiters escaped, not split
    assert str(pid[5][0][0]) == "Doe" and str(pid[5][0][1]) == "Jane"
    obr = got.segment("OBR")
    assert str(obr[3]) == "ACC0001" and str(obr[18]) == "ACC0001"
    assert str(obr[25]) == "P"
    assert str(got.segment("ZDS")[1][0][0]) == STUDY["study_uid"]
    obx = {str(seg[3][0][0]): seg for seg in got.segments("OBX")}
    finding = obx["1386000"]
    assert str(finding[2]) == "CWE"
    assert str(finding[3][0][2]) == "SCT" and str(finding[3][0][1]) == "Intracranial hemorrhage"
    assert str(finding[5][0][0]) == "52101004"  # Present
    assert str(finding[8]) == "A"
    assert str(finding[11]) == "P"
    certainty = obx["111012"]
    assert str(certainty[2]) == "NM" and float(str(certainty[5])) == pytest.approx(93.4)
    assert str(obx["110180"][5]) == STUDY["study_uid"]
    assert str(obx["111001"][5]) == "ich-ct" and str(obx["111003"][5]) == "1.0.0"


def test_negative_finding_has_normal_flag():
    job = dict(POSITIVE, present=False, certainty=0.88)
    got = hl7.parse(build_oru_r01(STUDY, job, sending_facility="F", receiving_application="RIS",
                                  control_id="2", now=NOW))
    finding = next(s for s in got.segments("OBX") if str(s[3][0][0]) == "1386000")
    assert str(finding[5][0][0]) == "272519000"  # Absent
    assert str(finding[8]) == "N"


def test_not_analysed_is_a_text_observation_with_the_reason():
    job = dict(POSITIVE, present=None, certainty=None, reason="1 slice, the ICH model needs at least 16")
    got = hl7.parse(build_oru_r01(STUDY, job, sending_facility="F", receiving_application="RIS",
                                  control_id="3", now=NOW))
    [text] = [s for s in got.segments("OBX") if str(s[2]) == "TX"]
    assert got.unescape(str(text[5])) == "Not analysed: 1 slice, the ICH model needs at least 16"
    assert str(text[3][0][0]) == "1386000"
    assert not [s for s in got.segments("OBX") if str(s[2]) in ("CWE", "NM")]


def test_state_db_job_row_with_result_is_read_like_an_api_row():
    row = {"id": 7, "model_name": "ich-ct", "model_version": "1.0.0", "state": "done",
           "result": json.dumps({"analysed": True, "present": True, "certainty": 0.934, "reason": "",
                                 "finding": ICH})}
    got = hl7.parse(build_oru_r01(STUDY, row, sending_facility="F", receiving_application="RIS",
                                  control_id="7", now=NOW))
    finding = next(s for s in got.segments("OBX") if str(s[3][0][0]) == "1386000")
    assert str(finding[8]) == "A"
    assert any(str(s[5]) == "ich-ct" for s in got.segments("OBX"))


def test_delimiters_in_values_are_escaped():
    assert escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    study = dict(STUDY, accession="A|1\rMSH|evil")
    message = build_oru_r01(study, POSITIVE, sending_facility="F", receiving_application="RIS",
                            control_id="4", now=NOW)
    segments = message.rstrip("\r").split("\r")
    assert [s[:3] for s in segments].count("MSH") == 1
    got = hl7.parse(message)
    assert str(got.segment("OBR")[3]) == "A\\F\\1\\.br\\MSH\\F\\evil"


def test_listener_down_raises_then_retry_gets_through():
    port = free_port()
    message = build_oru_r01(STUDY, POSITIVE, sending_facility="F", receiving_application="RIS",
                            control_id="5", now=NOW)
    with pytest.raises(DeliveryError, match="unreachable"):
        send_mllp("127.0.0.1", port, message, timeout=2)
    with MllpListener(port) as listener:
        ack = send_mllp("127.0.0.1", port, message, timeout=5)
    assert "MSA|AA|5" in ack and len(listener.messages) == 1


def test_negative_ack_raises():
    message = build_oru_r01(STUDY, POSITIVE, sending_facility="F", receiving_application="RIS",
                            control_id="6", now=NOW)
    with MllpListener(free_port(), ack_code="AE") as listener, pytest.raises(DeliveryError, match="AE"):
        send_mllp("127.0.0.1", listener.port, message, timeout=5)


def test_silent_listener_times_out():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(DeliveryError, match="no ACK"):
            send_mllp("127.0.0.1", port, "MSH|^~\\&|A\r", timeout=0.5)


class _Recorder(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []
    status = 204

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.headers.get("Authorization"), json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    handler = type("Handler", (_Recorder,), {"received": [], "status": 204})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_webhook_posts_json_with_token(http_server):
    server, handler = http_server
    url = f"http://127.0.0.1:{server.server_port}/hook"
    post_json(url, {"study_uid": "1.2.3", "present": True}, timeout=5, token="s3cret")
    assert handler.received == [("Bearer s3cret", {"study_uid": "1.2.3", "present": True})]


def test_webhook_non_2xx_and_unreachable_raise(http_server):
    server, handler = http_server
    handler.status = 503
    with pytest.raises(DeliveryError, match="503"):
        post_json(f"http://127.0.0.1:{server.server_port}/hook", {"a": 1}, timeout=5)
    with pytest.raises(DeliveryError, match="unreachable"):
        post_json(f"http://127.0.0.1:{free_port()}/hook", {"a": 1}, timeout=2)
    with pytest.raises(DeliveryError, match="not an http"):
        post_json("file:///etc/passwd", {"a": 1}, timeout=2)
