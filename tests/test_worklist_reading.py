"""The worklist as radiologists and administrators read it, on the REAL node in a real browser
(Debian's Chromium driven by Playwright), with Orthanc as the PACS and its viewer.

One node and one Orthanc serve this module. The node has three accounts made with
`befund user add` (a radiologist, an admin, an ML engineer), delivers every result to Orthanc
and, by a delivery rule, positives also to a "stroke" node that refuses connections, so their
delivery becomes a dead letter. It receives a bleed, a normal head CT and a 3-slice series.
Screenshots go to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import free_port, have_dcmtk, run_storescu
from tests.node_harness import BEFUND, RunningNode, poll
from tests.orthanc_peer import ORTHANC, OrthancPeer

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
FINAL = {"done", "delivered", "not analysed", "delivery failed"}
PASSWORDS = {"anna": "anna-reads-ct-2025", "otto": "otto-runs-the-node", "mona": "mona-trains-models"}
ROLES = {"anna": "radiologist", "otto": "admin", "mona": "ml"}
PATIENTS = {"positive": ("Positiv^Paul", "PAT-POS-1"), "negative": ("Negativ^Nora", "PAT-NEG-2"),
            "short": ("Kurz^Karl", "PAT-SHORT-3")}

pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) or not have_dcmtk() or not Path(ORTHANC).exists(),
    reason="needs Debian's chromium, dcmtk and orthanc")


def add_user(node: RunningNode, name: str) -> None:
    proc = subprocess.run([str(BEFUND), "user", "add", name, "--role", ROLES[name], "--password-stdin",
                           "--config", str(node.config_path)], input=PASSWORDS[name] + "\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"user {name} ({ROLES[name]}) added" in proc.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(node, orthanc, {label: (study uid, series uid, study date)})."""
    work = tmp_path_factory.mktemp("reading")
    stroke_port = free_port()  # nothing listens there: the stroke team's node is "down"
    node = RunningNode(work / "node")
    with OrthancPeer(node.config["ae_title"], node.dicom_port, lua=False, explorer=True) as pacs:
        node.config.update({
            "destinations": [
                {"name": "pacs", "ae_title": pacs.ae, "host": "127.0.0.1", "port": pacs.dicom_port},
                {"name": "stroke", "ae_title": "STROKE", "host": "127.0.0.1", "port": stroke_port}],
            "delivery_rules": [{"destination": "stroke", "finding": "present", "modality": ["CT"]}],
            "delivery": {"initial_backoff_s": 0.3, "max_backoff_s": 1.0, "dead_letter_after_s": 1.0},
            "viewer_url": pacs.url + "/app/explorer.html#study?uuid={orthanc_study_id}",
        })
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(json.dumps(node.config))  # YAML reads JSON
        for name in PASSWORDS:
            add_user(node, name)
        with node:
            studies = {}
            for seed, (label, finding, slices) in enumerate(
                    [("positive", "subdural", 24), ("negative", "none", 24), ("short", "none", 3)], 9501):
                name, pid = PATIENTS[label]
                files = write_ct_series(work / label, finding=finding, slices=slices, seed=seed,
                                        patient_name=name)
                for f in files:  # a known patient ID, to look for in the audit export
                    ds = pydicom.dcmread(f)
                    ds.PatientID = pid
                    ds.save_as(f)
                sent = run_storescu(files, ae="MODALITY", port=node.dicom_port, timeout=120)
                assert sent.returncode == 0, sent.output
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                studies[label] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate)
            for uid, _, _ in studies.values():
                node.wait_study_state(uid, FINAL, timeout=180)
            yield node, pacs, studies


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = context.new_page()
    pg.on("dialog", lambda d: d.accept())  # "Discard delivery ...?" is answered yes
    yield pg
    context.close()


def sign_in(page, node: RunningNode, name: str, password: str | None = None, expect_rows: bool = True):
    page.goto(node.url + "/")
    page.fill("#user", name)
    page.fill("#token", password or PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url(node.url + "/")
    if expect_rows:
        page.wait_for_selector("#rows tr")


def row(page, uid: str):
    return page.locator(f'tr[data-study-uid="{uid}"]')


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_radiologist_reads_plain_words_and_acknowledges_a_flag_with_name_and_time(page, site):
    node, _, studies = site
    pos, neg, short = (studies[k][0] for k in ("positive", "negative", "short"))
    sign_in(page, node, "anna")
    assert "anna (radiologist)" in page.inner_text("#who")
    positive = row(page, pos).inner_text()
    assert "Intracranial hemorrhage" in positive and "certain" in positive
    negative = row(page, neg).inner_text()
    assert "No intracranial hemorrhage detected" in negative and "certain" in negative
    assert "Absent" not in negative
    # The reason, in words first; the series UID is left to the detail view.
    reason = row(page, short).locator(".reason").inner_text()
    assert reason.startswith("3 slices") and "16" in reason
    assert studies["short"][1] not in reason
    text = page.inner_text("#worklist")
    assert "not_analysed" not in text and studies["positive"][2] not in text  # no raw DA date
    headers = page.eval_on_selector_all("#worklist th", "ths => ths.map(t => t.textContent.trim())")
    assert {"Received", "Result", "Study date"} <= set(headers)
    # "Positive, not yet acknowledged" shows the positive only, until it is acknowledged.
    page.select_option("#show", "unacknowledged")
    shown = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.studyUid)")
    assert shown == [pos]
    assert page.is_hidden("#dead-letters")  # a radiologist does not steer deliveries
    shot(page, "worklist-radiologist-unacknowledged.png")
    row(page, pos).locator("button[data-action=acknowledge]").click()
    page.wait_for_selector("#empty", state="visible")  # no positive left to acknowledge
    page.select_option("#show", "all")
    review = row(page, pos).locator(".review").inner_text()
    assert review.startswith("Acknowledged by anna, ")
    assert node.study(pos)["state"] in FINAL
    _, body = node.api("/studies")
    acked = next(s for s in body["studies"] if s["study_uid"] == pos)
    assert acked["review"]["user"] == "anna" and acked["review"]["action"] == "acknowledged"
    # A radiologist cannot resend, run or read the audit log, even by hand.
    deliveries = node.api(f"/studies/{pos}")[1]["deliveries"]
    for path in (f"/deliveries/{deliveries[0]['id']}/resend", f"/studies/{pos}/run"):
        answer = page.request.post(node.url + path, headers={"Origin": node.url})
        assert answer.status == 403, path
    assert page.request.get(node.url + "/audit").status == 403
    assert page.request.get(node.url + "/config").status == 403
    shot(page, "worklist-radiologist.png")


def test_detail_view_shows_every_key_image_at_512_px_with_window_and_slice_and_enlarges(page, site):
    node, _, studies = site
    pos = studies["positive"][0]
    sign_in(page, node, "anna")
    page.goto(f"{node.url}/view/{pos}")
    page.wait_for_function("(() => { const imgs = [...document.querySelectorAll('.key-image img')];"
                           " return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth); })()")
    widths = page.eval_on_selector_all(".key-image img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 3 and min(widths) >= 512
    captions = page.eval_on_selector_all(".key-image figcaption", "c => c.map(x => x.innerText)")
    assert all("brain W80/L40" in c and "slice" in c and " of 24" in c for c in captions)
    assert captions[0].startswith("Key image 1 of 3")
    detail = page.inner_text("#study")
    assert "Acknowledged by anna" in detail
    # "Next attempt" only for deliveries still pending: the delivered ones leave it empty.
    cells = page.eval_on_selector_all(
        "#study table.grid:last-of-type tbody tr",
        "rows => rows.map(r => [...r.children].map(c => c.innerText))")
    delivered = [c for c in cells if c[3] == "Delivered"]
    assert delivered and all(c[8] == "" for c in delivered)
    page.click(".key-image img >> nth=0")
    page.wait_for_selector(".lightbox img")
    assert page.evaluate("document.querySelector('.lightbox img').naturalWidth") >= 512
    shot(page, "study-key-image-enlarged.png")
    page.keyboard.press("Escape")
    assert page.locator(".lightbox").count() == 0
    shot(page, "study-key-images.png")


def test_the_viewer_link_opens_the_study_in_orthancs_own_study_page(page, site):
    node, pacs, studies = site
    pos = studies["positive"][0]
    pacs.wait_for(lambda: pacs.find_series(pos, "SR"), 60, "the SR in Orthanc")
    sign_in(page, node, "anna")
    link = row(page, pos).locator("a.viewer")
    href = link.get_attribute("href")
    assert href.startswith(pacs.url + "/app/explorer.html#study?uuid=")
    orthanc_id = pacs.find_series(pos, "SR")[0]["ParentStudy"]
    assert href.endswith(orthanc_id)  # the ID befund computes is Orthanc's own
    with page.context.expect_page() as opened:
        link.click()
    viewer = opened.value
    viewer.wait_for_load_state()
    viewer.wait_for_function("arg => document.body.innerText.includes(arg)", arg=pos, timeout=30_000)
    assert "Positiv" in viewer.inner_text("body")
    shot(viewer, "viewer-orthanc-study.png")


def test_admin_resends_and_discards_a_dead_letter_of_the_stroke_rule(page, site):
    node, _, studies = site
    pos, neg = studies["positive"][0], studies["negative"][0]
    # The rule sends positives (only) to the stroke node, which is down: a dead letter.
    kinds = {(d["destination"], d["state"]) for d in node.api(f"/studies/{pos}")[1]["deliveries"]}
    assert ("pacs", "delivered") in kinds and any(dest == "stroke" for dest, _ in kinds)
    assert {d["destination"] for d in node.api(f"/studies/{neg}")[1]["deliveries"]} == {"pacs"}
    log = node.log_path.read_text(errors="replace")
    assert "befund: results go to DICOM pacs = ORTHANC@127.0.0.1:" in log
    assert "DICOM stroke = STROKE@127.0.0.1:" in log and "(finding present, modality CT)" in log
    assert node.api("/status")[1]["deliveries"]["notice"] == ""
    dead = poll(lambda: node.api("/deliveries?state=dead")[1]["deliveries"], 60, 0.3, "a dead letter")
    assert [d["destination"] for d in dead] == ["stroke"] and dead[0]["study_uid"] == pos
    sign_in(page, node, "otto")
    letter = page.wait_for_selector(f'#dead-letter-rows tr[data-delivery-id="{dead[0]["id"]}"]')
    assert "dicom to stroke" in letter.inner_text()
    shot(page, "worklist-admin-dead-letters.png")
    page.click(f'#dead-letter-rows button[data-delivery="{dead[0]["id"]}"][data-action=resend]')

    def attempts() -> int:
        rows = node.api(f"/studies/{pos}")[1]["deliveries"]
        return next(d for d in rows if d["id"] == dead[0]["id"])["attempts"]

    poll(lambda: attempts() > dead[0]["attempts"], 60, 0.3, "a new attempt after resend")
    poll(lambda: node.api("/deliveries?state=dead")[1]["deliveries"], 60, 0.3, "dead again")
    page.wait_for_selector(f'#dead-letter-rows button[data-delivery="{dead[0]["id"]}"][data-action=discard]',
                           timeout=20_000)
    page.click(f'#dead-letter-rows button[data-delivery="{dead[0]["id"]}"][data-action=discard]')
    page.wait_for_selector("#dead-letters", state="hidden", timeout=20_000)
    states = {d["id"]: d["state"] for d in node.api(f"/studies/{pos}")[1]["deliveries"]}
    assert states[dead[0]["id"]] == "discarded"
    config = page.request.get(node.url + "/config").json()["config"]  # the admin's config view
    assert config["token"] == "(set)" and node.config["token"] not in json.dumps(config)
    assert [r["destination"] for r in config["delivery_rules"]] == ["stroke"]
    # An admin steers deliveries but does not acknowledge findings.
    answer = page.request.post(f"{node.url}/studies/{pos}/acknowledge", headers={"Origin": node.url})
    assert answer.status == 403


def test_ml_role_sees_no_patients_and_the_token_no_longer_signs_browsers_in(page, site):
    node, _, _ = site
    sign_in(page, node, "mona", expect_rows=False)
    assert "does not see patients' studies" in page.inner_text("#role-notice")
    assert "Kurz" not in page.content() and "Positiv" not in page.content()
    assert page.request.get(node.url + "/studies").status == 403
    assert page.request.get(node.url + "/models").status == 200
    page.click("a.logout")
    page.wait_for_selector("#user")
    assert page.get_attribute("#user", "required") is not None
    refused = page.request.post(node.url + "/login", form={"token": node.config["token"]},
                                headers={"Origin": node.url}, max_redirects=0)
    assert refused.status == 401 and "user name and password" in refused.text()  # the token, no name
    page.fill("#user", "anna")
    page.fill("#token", "not-annas-password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.inner_text(".error")


def test_every_view_and_acknowledge_is_in_the_audit_log_and_its_export_names_no_patient(page, site):
    node, _, studies = site
    pos = studies["positive"][0]
    code, body = node.api(f"/audit?study_uid={pos}")
    assert code == 200
    seen = {(e["user"], e["role"], e["action"]) for e in body["entries"]}
    assert ("anna", "radiologist", "view_study") in seen
    assert ("anna", "radiologist", "acknowledge") in seen
    assert ("otto", "admin", "resend_delivery") in seen and ("otto", "admin", "discard_delivery") in seen
    assert all(e["address"] == "127.0.0.1" and e["at"] > 0 for e in body["entries"])
    everyone = {(e["user"], e["action"]) for e in node.api("/audit?limit=5000")[1]["entries"]}
    assert {("anna", "view_worklist"), ("mona", "sign_in"), ("otto", "view_deliveries")} <= everyone
    assert not any(user == "mona" and action.startswith("view_study") for user, action in everyone)
    # The export an admin downloads: JSON lines, no patient names or IDs at all.
    sign_in(page, node, "otto")
    answer = page.request.get(node.url + "/audit.jsonl")
    assert answer.status == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
    lines = answer.text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) >= len(body["entries"]) and {"user", "role", "action", "study_uid", "address",
                                                     "at_iso"} <= set(entries[0])
    for name, pid in PATIENTS.values():
        for part in (*name.split("^"), pid):
            assert part not in answer.text()
    after = node.api("/audit?limit=5000")[1]["entries"]
    assert ("otto", "export_audit") in {(e["user"], e["action"]) for e in after}
    assert page.request.get(node.url + "/audit.jsonl?since=abc").status == 400
