"""The real node tells the RIS: an ORU^R01 over MLLP to a real `hl7` library listener, and a JSON
webhook to an http.server, after a head CT is analysed; an HL7 outage is ridden out by the
outbox (backoff) and the message arrives once the listener is back.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import free_port, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.test_hl7_notifier import MllpListener

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

ICH_CODE = "1386000"


class WebhookReceiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    handler = type("Handler", (WebhookReceiver,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/befund", handler.received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hl7_port():
    return free_port()


@pytest.fixture(scope="module")
def node(tmp_path_factory, webhook, hl7_port):
    work = tmp_path_factory.mktemp("hl7-node")
    with RunningNode(work / "node",
                     hl7={"host": "127.0.0.1", "port": hl7_port}, webhooks=[webhook[0]]) as n:
        yield n


def send_study(node, folder: Path, finding: str, seed: int) -> tuple[str, str]:
    files = write_ct_series(folder, finding=finding, slices=24, seed=seed)
    sent = run_storescu(files, ae="MODALITY", port=node.dicom_port, timeout=120)
    assert sent.returncode == 0, sent.output
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return ds.StudyInstanceUID, str(ds.AccessionNumber)


def messages_for(listener: MllpListener, study_uid: str) -> list[hl7.Message]:
    return [m for m in listener.messages if str(m.segment("ZDS")[1][0][0]) == study_uid]


def finding_obx(message: hl7.Message):
    return next(s for s in message.segments("OBX") if str(s[3][0][0]) == ICH_CODE)


def hl7_delivery(node, study_uid: str) -> dict | None:
    study = node.study(study_uid) or {}
    return next((d for d in study.get("deliveries", []) if d["kind"] == "hl7"), None)


def test_bleed_reaches_the_ris_as_oru_r01_and_the_webhook_as_json(node, hl7_port, webhook, tmp_path):
    with MllpListener(hl7_port) as listener:
        study_uid, accession = send_study(node, tmp_path / "bleed", "subdural", 9301)
        [message] = poll(lambda: messages_for(listener, study_uid), 120, 0.2, "ORU^R01 at the RIS")
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(message.segment("MSH")[12]) == "2.5"
    obr = message.segment("OBR")
    assert str(obr[3]) == accession and str(obr[25]) == "P"  # preliminary
    finding = finding_obx(message)
    assert str(finding[3][0][2]) == "SCT"
    assert str(finding[5][0][0]) == "52101004"  # Present
    assert str(finding[8]) == "A"  # abnormal
    certainty = next(s for s in message.segments("OBX") if str(s[3][0][0]) == "111012")
    assert 50.0 <= float(str(certainty[5])) <= 100.0
    assert any(str(s[5]) == "ich_ct" for s in message.segments("OBX"))

    hooks = poll(lambda: [h for h in webhook[1] if h["study_uid"] == study_uid], 30, 0.1, "webhook")
    assert hooks[0]["present"] is True and hooks[0]["model"] == "ich_ct"
    assert hooks[0]["accession"] == accession
    assert node.wait_study_state(study_uid, {"delivered"})["present"] is True


def test_ris_down_during_analysis_gets_the_result_when_it_is_back(node, hl7_port, tmp_path):
    # Nobody listens on the HL7 port while the second study is analysed.
    study_uid, _ = send_study(node, tmp_path / "normal", "none", 9302)
    failed = poll(lambda: (lambda d: d if d and d["attempts"] >= 2 else None)(
        hl7_delivery(node, study_uid)), 120, 0.2, "two failed HL7 attempts")
    assert failed["state"] == "pending" and "unreachable" in failed["last_error"]
    assert node.study(study_uid)["state"] == "done"  # analysed, not yet delivered everywhere
    with MllpListener(hl7_port) as listener:
        [message] = poll(lambda: messages_for(listener, study_uid), 30, 0.1, "ORU^R01 after outage")
        assert str(finding_obx(message)[5][0][0]) == "272519000"  # Absent
        assert str(finding_obx(message)[8]) == "N"
        delivered = poll(lambda: (lambda d: d if d and d["state"] == "delivered" else None)(
            hl7_delivery(node, study_uid)), 30, 0.1, "HL7 delivery recorded")
    assert delivered["attempts"] >= 2
    assert node.wait_study_state(study_uid, {"delivered"})["present"] is False
