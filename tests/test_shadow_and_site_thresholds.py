"""Shadow mode and per-site operating points on the REAL node (`befund serve`), DCMTK storescu as
the modalities and DCMTK storescp as the PACS.

The models folder holds the reference ich_ct (0.1.0, active) and a copy of it as 0.2.0 in
shadow mode, tuned far too sensitive (threshold 0.0001: it flags every head CT). The config
gives the active version per-site thresholds (CT_NORTH 0.3, CT_SOUTH 0.7, the institution
"Klinikum Nord" 0.4) and the shadow version its own for CT_SOUTH (0.5). Three head CTs:

    study   sent by    institution     active 0.1.0           shadow 0.2.0
    bleed   CT_NORTH   phantom's       positive at 0.3        positive at 0.0001
    normal  CT_SOUTH   phantom's       negative at 0.7        negative at 0.5 (its own entry)
    quiet   MODALITY   Klinikum Nord   negative at 0.4        positive at 0.0001: they disagree

The PACS gets one SR per study, each the active version's, with the threshold it used (and
the RIS one HL7 ORU^R01, the webhook one call, both the active version's); the API
shows both jobs with their modes; the shadow report counts 3 studies, agreement 2/3, kappa 0.4
and names the quiet study; the radiologist sees only the active verdicts, the ML engineer the
shadow view. One node for the module.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pydicom
import pytest
import yaml

from phantoms.ct_head import write_ct_series
from pipelines.sr_reading import read_result_sr
from tests.dicom_peers import StoreSCP, free_port, have_dcmtk, run_storescu
from tests.node_harness import BEFUND, PROJECT, RunningNode, poll
from tests.pacs_results import ANY_OBJECT_ARGS, results_for_study
from tests.test_hl7_notifier import MllpListener
from tests.test_hl7_through_node import messages_for, webhook  # noqa: F401 - the webhook fixture

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SLICES = 20
PASSWORDS = {"anna": "anna-reads-ct-2025", "mona": "mona-trains-models"}
ROLES = {"anna": "radiologist", "mona": "ml"}
SITE_THRESHOLDS = {
    "ich_ct@0.1.0": {"calling_ae": {"CT_NORTH": 0.3, "CT_SOUTH": 0.7},
                     "institution": {"Klinikum Nord": 0.4}},
    "ich_ct@0.2.0": {"calling_ae": {"CT_SOUTH": 0.5}},
}
STUDIES = {  # label: (finding, seed, calling AE, institution or None for the phantom's)
    "bleed": ("subdural", 9701, "CT_NORTH", None),
    "normal": ("none", 9702, "CT_SOUTH", None),
    "quiet": ("none", 9703, "MODALITY", "Klinikum Nord"),
}


def model_copy(models: Path, folder: str, **card: object) -> None:
    target = models / folder
    shutil.copytree(PROJECT / "models" / "ich_ct", target, ignore=shutil.ignore_patterns("*.py", "*.png"))
    data = yaml.safe_load((target / "card.yaml").read_text())
    for key, value in card.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    (target / "card.yaml").write_text(yaml.safe_dump(data))


def add_user(node: RunningNode, name: str) -> None:
    proc = subprocess.run([str(BEFUND), "user", "add", name, "--role", ROLES[name], "--password-stdin",
                           "--config", str(node.config_path)], input=PASSWORDS[name] + "\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory, webhook):  # noqa: F811 - the imported fixture
    """(node, pacs, {label: study UID}) once every job of the three studies has finished; the
    node also sends to an HL7 listener (`site_hl7`) and a webhook receiver."""
    work = tmp_path_factory.mktemp("lifecycle")
    models = work / "models"
    model_copy(models, "ich_ct")
    model_copy(models, "ich_ct_next", version="0.2.0", mode="shadow", supersedes="0.1.0",
               postprocessing={"threshold": 0.0001})
    hl7_port = free_port()
    with StoreSCP(work / "pacs", ae="PACS", extra_args=ANY_OBJECT_ARGS) as pacs, \
            MllpListener(hl7_port) as ris:
        node = RunningNode(work / "node", pacs=f"PACS@127.0.0.1:{pacs.port}",
                           models_dir=str(models), site_thresholds=SITE_THRESHOLDS,
                           hl7={"host": "127.0.0.1", "port": hl7_port}, webhooks=[webhook[0]])
        node.ris, node.hooks = ris, webhook[1]
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(yaml.safe_dump(node.config))
        for name in PASSWORDS:
            add_user(node, name)
        with node:
            studies = {}
            for label, (finding, seed, ae, institution) in STUDIES.items():
                files = write_ct_series(work / label, finding=finding, slices=SLICES, seed=seed)
                if institution:
                    for f in files:
                        ds = pydicom.dcmread(f)
                        ds.InstitutionName = institution
                        ds.save_as(f)
                sent = run_storescu(files, ae=ae, port=node.dicom_port, timeout=120)
                assert sent.returncode == 0, sent.output
                studies[label] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            for uid in studies.values():
                poll(lambda u=uid: all_jobs_final(node, u), 120, 0.25, f"both jobs of study {uid}")
                node.wait_study_state(uid, {"delivered"}, timeout=60)
            yield node, pacs, studies


def all_jobs_final(node: RunningNode, uid: str) -> bool:
    study = node.study(uid)
    return bool(study) and len(study["jobs"]) == 2 and all(
        j["state"] in ("done", "not_analysed", "failed") for j in study["jobs"])


def jobs_by_mode(node: RunningNode, uid: str) -> dict[str, dict]:
    return {j["mode"]: j for j in node.study(uid)["jobs"]}


def test_the_pacs_receives_only_the_active_versions_sr(site):
    node, pacs, studies = site
    for uid in studies.values():
        srs = results_for_study(pacs.directory, uid, "SR")
        assert len(srs) == 1, [s.SeriesDescription for s in srs]
        assert read_result_sr(srs[0])["algorithm"]["version"] == "0.1.0"
        shadow = jobs_by_mode(node, uid)["shadow"]
        assert not [d for d in node.study(uid)["deliveries"] if d["job_id"] == shadow["id"]]


def test_hl7_and_the_webhook_get_only_the_active_versions_result(site):
    node, _, studies = site
    for uid in studies.values():
        [message] = messages_for(node.ris, uid)
        assert any(str(s[5]) == "ich_ct" for s in message.segments("OBX"))
        [hook] = [h for h in node.hooks if h["study_uid"] == uid]
        assert (hook["model"], hook["model_version"]) == ("ich_ct", "0.1.0")


def test_the_sr_records_the_threshold_of_each_sending_site(site):
    node, pacs, studies = site
    expected = {"bleed": ("0.3", "calling AE CT_NORTH", True),
                "normal": ("0.7", "calling AE CT_SOUTH", False),
                "quiet": ("0.4", "institution Klinikum Nord", False)}
    for label, (threshold, source, present) in expected.items():
        [sr] = results_for_study(pacs.directory, studies[label], "SR")
        info = read_result_sr(sr)
        assert info["present"] is present
        assert f"threshold={threshold}" in info["algorithm"]["parameters"]
        assert f"threshold_source={source}" in info["algorithm"]["parameters"]
        active = jobs_by_mode(node, studies[label])["active"]
        assert (active["threshold"], active["threshold_source"]) == (float(threshold), source)
        assert active["present"] is (active["score"] >= active["threshold"]) is present


def test_the_api_shows_both_jobs_with_their_modes_and_the_shadow_its_own_threshold(site):
    node, _, studies = site
    for label, shadow_present, shadow_threshold in [("bleed", True, 0.0001), ("normal", False, 0.5),
                                                    ("quiet", True, 0.0001)]:
        jobs = jobs_by_mode(node, studies[label])
        assert (jobs["active"]["model_version"], jobs["shadow"]["model_version"]) == ("0.1.0", "0.2.0")
        assert jobs["shadow"]["present"] is shadow_present
        assert jobs["shadow"]["threshold"] == shadow_threshold
        assert jobs["shadow"]["score"] == pytest.approx(jobs["active"]["score"])  # the same model
    status, models = node.api("/models")
    assert status == 200
    assert {(m["version"], m["mode"]) for m in models["models"]} == {("0.1.0", "active"), ("0.2.0", "shadow")}
    checks = {c["name"]: c for c in node.api("/status")[1]["checks"]}
    assert "ich_ct@0.2.0 (shadow)" in checks["models"]["detail"]


def test_the_shadow_report_counts_both_versions_on_the_same_studies(site):
    node, _, studies = site
    status, report = node.api("/models/ich_ct/shadow-report?since=1h")
    assert status == 200, report
    [pair] = report["pairs"]
    assert (pair["active"], pair["shadow"]) == ("0.1.0", "0.2.0")
    assert pair["studies_seen_by_both"] == 3 and pair["analysed_by_both"] == 3
    assert pair["table"] == {"both_positive": 1, "active_only": 0, "shadow_only": 1, "both_negative": 1}
    assert pair["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert pair["kappa"] == pytest.approx(0.4, abs=1e-4)
    assert pair["flag_rate"] == {"active": pytest.approx(1 / 3, abs=1e-4),
                                 "shadow": pytest.approx(2 / 3, abs=1e-4)}
    [flip] = pair["disagreements"]
    assert flip["study_uid"] == studies["quiet"] and flip["shadow"]["present"] is True
    assert "Phantom" not in json.dumps(report)  # UIDs, never patient names
    for bad in ("yesterday", "500d"):
        assert node.api(f"/models/ich_ct/shadow-report?since={bad}")[0] == 400
    assert node.api("/models/ich_ct/shadow-report", token=None)[0] == 401

    out = node.workdir / "shadow-report"
    cli = subprocess.run([str(BEFUND), "model", "shadow-report", "ich_ct", "--since", "1h",
                          "--config", str(node.config_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "active 0.1.0 vs shadow 0.2.0" in cli.stdout and "66.7 %" in cli.stdout
    assert "Cohen's kappa 0.400" in cli.stdout and studies["quiet"] in cli.stdout
    written = json.loads((out / "shadow-report.json").read_text())
    assert written["report"]["pairs"][0]["kappa"] == pair["kappa"] and written["provenance"]["node"]
    assert (out / "shadow-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def sign_in(node: RunningNode, name: str) -> str:
    form = f"user={name}&token={quote(PASSWORDS[name])}&next=%2F".encode()
    status, headers, _ = request(node, "POST", "/login", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": node.url})
    assert status == 303, status
    return re.match(r"befund_session=([^;]*);", headers["set-cookie"]).group(1)


def request(node: RunningNode, method: str, path: str, cookie: str = "", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={
            **({"Cookie": f"befund_session={cookie}"} if cookie else {}), **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_the_radiologist_sees_only_the_active_verdicts(site):
    node, _, studies = site
    anna = sign_in(node, "anna")
    status, _, body = request(node, "GET", "/studies", anna)
    assert status == 200
    rows = {r["study_uid"]: r for r in json.loads(body)["studies"]}
    assert [rows[studies[k]]["present"] for k in ("bleed", "normal", "quiet")] == [True, False, False]
    assert {rows[uid]["model_version"] for uid in studies.values()} == {"0.1.0"}
    status, _, body = request(node, "GET", f"/studies/{studies['quiet']}", anna)
    detail = json.loads(body)
    assert status == 200 and detail["present"] is False
    assert [(j["model_version"], j["mode"]) for j in detail["jobs"]] == [("0.1.0", "active")]
    assert request(node, "GET", "/models/ich_ct/shadow-report", anna)[0] == 403
    assert request(node, "GET", "/shadow/studies", anna)[0] == 403
    assert request(node, "GET", "/shadow", anna)[0] == 403


def test_the_ml_engineer_sees_the_shadow_view_but_no_patients(site):
    node, _, studies = site
    mona = sign_in(node, "mona")
    assert request(node, "GET", "/studies", mona)[0] == 403
    status, _, body = request(node, "GET", "/shadow/studies", mona)
    assert status == 200
    rows = {r["study_uid"]: r for r in json.loads(body)["rows"]}
    assert set(rows) == set(studies.values())
    assert rows[studies["quiet"]]["agree"] is False and rows[studies["bleed"]]["agree"] is True
    assert "Phantom" not in body.decode()
    status, _, page = request(node, "GET", "/shadow", mona)
    assert status == 200 and b'data-page="shadow"' in page and studies["quiet"].encode() in page
    assert request(node, "GET", "/models/ich_ct/shadow-report?since=1h", mona)[0] == 200


def test_the_shadow_page_renders_the_rows_in_a_browser(site):
    """The page's script (service/static/worklist.js) draws the shadow view; Debian's Chromium."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("needs Debian's chromium")
    node, _, studies = site
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(node.url + "/shadow")
            page.fill("#user", "mona")
            page.fill("#token", PASSWORDS["mona"])
            page.click("button[type=submit]")
            page.wait_for_url(node.url + "/shadow")
            page.wait_for_selector("#shadow-rows tr")
            assert page.locator("#shadow-rows tr").count() == 3
            quiet = page.locator("#shadow-rows tr", has_text=studies["quiet"])
            assert "0.1.0: negative" in quiet.inner_text() and "0.2.0: positive" in quiet.inner_text()
            assert page.locator("#count-disagree").inner_text() == "1 disagree"
            assert errors == []
        finally:
            browser.close()
