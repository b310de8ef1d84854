"""Accounts, roles, the audit log, delivery rules and the reader's words, without a node."""

from __future__ import annotations

import json
import re
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.audit_log import AuditLog
from service.auth import TokenAuth
from service.config import ConfigError, Destination, load_config
from service.delivery_rules import DeliveryRule, destinations_for, summary
from service.reader_rows import reason_text, verdict_text
from service.state_db import StateDB
from service.users import MACHINE, UserError, UserStore
from service.viewer_links import check_template, orthanc_study_id, viewer_url
from service.web_access import denied, principal, record

TOKEN = "machine-token-0123456789abcdef-0123456789"


@pytest.fixture()
def db(tmp_path):
    d = StateDB(tmp_path / "state.sqlite")
    yield d
    d.close()


def test_passwords_are_argon2id_hashes_and_only_the_right_one_signs_in(db):
    users = UserStore(db)
    assert not users.any()
    users.add("anna", "radiologist", "correct horse battery")
    stored = db.query_one("SELECT password_hash FROM users WHERE name='anna'")["password_hash"]
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert users.verify("anna", "correct horse battery").role == "radiologist"
    assert users.verify("anna", "correct horse batterY") is None
    assert users.verify("nobody", "correct horse battery") is None
    with pytest.raises(UserError, match="exists already"):
        users.add("anna", "admin", "another long password")
    with pytest.raises(UserError, match="12 to 256"):
        users.add("bert", "admin", "short")
    with pytest.raises(UserError, match="role"):
        users.add("bert", "root", "a long enough password")
    with pytest.raises(UserError, match="user name"):
        users.add("Robert'); DROP", "admin", "a long enough password")
    assert users.disable("anna") and users.verify("anna", "correct horse battery") is None


def test_roles_radiologist_acknowledges_but_cannot_resend_admin_resends_but_does_not_acknowledge():
    from service.users import Principal

    anna, otto, mona = Principal("anna", "radiologist"), Principal("otto", "admin"), Principal("mona", "ml")
    assert anna.may("read") and anna.may("acknowledge") and not anna.may("resend") and not anna.may("audit")
    assert otto.may("resend") and otto.may("discard") and otto.may("audit") and not otto.may("acknowledge")
    assert mona.may("models") and not mona.may("read")
    assert MACHINE.may("resend") and MACHINE.may("read")


def gate_app(db, audit):
    async def resend(request: Request) -> JSONResponse:
        if refused := denied(request, "resend"):
            return refused
        record(request, "resend_delivery", "1.2.3", detail="delivery 7")
        return JSONResponse({"by": principal(request).name})

    async def view(request: Request) -> JSONResponse:
        if refused := denied(request, "read"):
            return refused
        record(request, "view_study", "1.2.3")
        return JSONResponse({"by": principal(request).name})

    app = Starlette(routes=[Route("/resend", resend, methods=["POST"]), Route("/view", view)])
    return TokenAuth(app, TOKEN, accounts=UserStore(db), audit=audit)


def test_the_gate_signs_in_by_name_refuses_the_token_once_accounts_exist_and_logs_who(db):
    audit = AuditLog(db, window_s=60)
    with TestClient(gate_app(db, audit), base_url="http://testserver") as client:
        # No account yet: the token signs a browser in (first start).
        first = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert first.status_code == 303
        client.cookies.clear()
        UserStore(db).add("anna", "radiologist", "anna-reads-ct-2025")
        assert client.get("/view", headers={"Accept": "application/json"}).status_code == 401
        refused = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert refused.status_code == 401 and "user name and password" in refused.text
        ok = client.post("/login", data={"user": "anna", "token": "anna-reads-ct-2025"},
                         follow_redirects=False)
        assert ok.status_code == 303
        assert client.get("/view").json() == {"by": "anna"}
        assert client.get("/view").status_code == 200  # a repeated view within the window
        assert client.post("/resend", headers={"Origin": "http://testserver"}).status_code == 403
        # A bearer token is a machine: it may resend.
        machine = client.post("/resend", headers={"Authorization": f"Bearer {TOKEN}"})
        assert machine.json() == {"by": "api-token"}
        # Disabled: the open session ends with the next request.
        UserStore(db).disable("anna")
        assert client.get("/view", headers={"Accept": "application/json"}).status_code == 401
    actions = [(e["user"], e["action"]) for e in audit.query()]
    assert actions.count(("anna", "view_study")) == 1
    assert ("anna", "sign_in") in actions and ("-", "sign_in_refused") in actions
    assert ("api-token", "resend_delivery") in actions and ("token", "sign_in") in actions


def test_audit_export_is_json_lines_in_order_with_filters(db):
    audit = AuditLog(db, window_s=60)
    t0 = time.time()
    audit.record("anna", "radiologist", "view_study", "1.2.3", "10.0.0.5", at=t0)
    audit.record("anna", "radiologist", "view_study", "1.2.3", "10.0.0.5", at=t0 + 5)  # same view
    audit.record("anna", "radiologist", "acknowledge", "1.2.3", "10.0.0.5", at=t0 + 6)
    audit.record("otto", "admin", "resend_delivery", "1.2.4", "10.0.0.9", at=t0 + 7)
    audit.record("anna", "radiologist", "view_study", "1.2.3", "10.0.0.5", at=t0 + 70)  # a minute on
    lines = list(audit.export_lines())
    entries = [json.loads(line) for line in lines]
    assert [e["action"] for e in entries] == ["view_study", "acknowledge", "resend_delivery", "view_study"]
    assert all(line.endswith("\n") for line in lines) and entries[0]["at_iso"].endswith("Z")
    assert [e["user"] for e in audit.query(study_uid="1.2.4")] == ["otto"]
    assert len(audit.query(since=t0 + 6, until=t0 + 8)) == 2
    with pytest.raises(ValueError):
        audit.record("anna", "radiologist", "drop_table")


def test_delivery_rules_send_positives_to_the_stroke_team_and_everything_to_the_pacs(tmp_path):
    pacs = Destination("PACS", "10.0.0.5", 104, "pacs")
    stroke = Destination("STROKE", "10.0.0.6", 104, "stroke")
    rules = (DeliveryRule("stroke", modality=("CT",), finding="present"),)
    to = lambda **facts: [d.name for d in destinations_for((pacs, stroke), rules, facts)]  # noqa: E731
    assert to(modality="CT", calling_ae="CT1", finding="present") == ["pacs", "stroke"]
    assert to(modality="CT", calling_ae="CT1", finding="absent") == ["pacs"]
    assert to(modality="SM", calling_ae="CT1", finding="present") == ["pacs"]
    by_ae = (DeliveryRule("stroke", calling_ae=("CT_ER",)),)
    er, op = ({"calling_ae": ae} for ae in ("CT_ER", "CT_OP"))
    assert [d.name for d in destinations_for((pacs, stroke), by_ae, er)] == ["pacs", "stroke"]
    assert [d.name for d in destinations_for((pacs, stroke), by_ae, op)] == ["pacs"]
    config = tmp_path / "befund.yaml"
    config.write_text(json.dumps({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
                         {"name": "stroke", "ae_title": "STROKE", "host": "s", "port": 104}],
        "delivery_rules": [{"destination": "stroke", "finding": "present", "modality": "CT"}]}))
    loaded = load_config(config, env={})
    assert loaded.delivery_rules == rules
    lines = summary(loaded)
    assert lines["notice"] == ""
    assert "DICOM stroke = STROKE@s:104 (finding present, modality CT)" in lines["targets"]
    for bad, message in (
            ({"delivery_rules": [{"destination": "nowhere"}]}, "not among destinations"),
            ({"delivery_rules": [{"destination": "stroke", "finding": "maybe"}]}, "finding"),
            ({"delivery_rules": [{"destination": "stroke", "when": "always"}]}, "unknown key"),
            ({"destinations": ["A@h:1", "B@h:2"], "delivery_rules": []}, "distinct names")):
        data = json.loads(config.read_text()) | bad
        config.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=message):
            load_config(config, env={})
    assert "not sent anywhere" in summary(load_config(None, env={}))["notice"]


def test_reasons_start_in_plain_words_and_leave_identifiers_to_the_detail_view():
    uid = "1.2.826.0.1.3680043.8.498.123456789"
    assert reason_text(f"series {uid} not analysed: 3 slices, ich_ct needs at least 16") == \
        "3 slices, ich_ct needs at least 16"
    assert reason_text("no model takes this series (MR, HEAD): ich_ct: modality 'MR' not in ['CT']") == \
        "No model here analyses this kind of series (MR, HEAD)."
    assert reason_text(f"dicom to pacs: DeliveryError: cannot connect to PACS@10.0.0.5:104 ({uid})") == \
        "The result could not be sent to the PACS (pacs); the detail view says why."
    assert reason_text(f"slide {uid} is scanned at 2 um/px") == "The slide is scanned at 2 um/px"
    assert uid not in reason_text(f"/var/spool/{uid}/x.dcm: pixel data element not found")
    assert verdict_text({"present": False, "state": "done"}, "Intracranial hemorrhage") == \
        "No intracranial hemorrhage detected"
    assert verdict_text({"present": True, "state": "done"}, "Neoplasm") == "Neoplasm"


def test_viewer_links_fill_the_template_and_orthanc_ids_follow_orthanc():
    template = "http://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}&acc={accession}"
    row = {"study_uid": "1.2.3", "accession": "A 1&2", "patient_id": "P1"}
    assert viewer_url(template, row) == "http://pacs/ohif/viewer?StudyInstanceUIDs=1.2.3&acc=A%201%262"
    assert viewer_url("", row) is None
    # Orthanc's study ID: SHA-1 of "PatientID|StudyInstanceUID" in five 8-hex groups.
    # (test_worklist_reading.py checks it against a running Orthanc's own ID of a study)
    assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", orthanc_study_id("P1", "1.2.3"))
    assert orthanc_study_id("P1", "1.2.3") != orthanc_study_id("P2", "1.2.3")
    for bad in ("javascript:alert(1)//{study_uid}", "http://pacs/{patient_name}", "/relative/{study_uid}"):
        with pytest.raises(ValueError):
            check_template(bad)
