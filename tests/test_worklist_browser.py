"""The worklist of the REAL node in a real browser (Debian's Chromium driven by Playwright, offline).

One node serves this module: storescu sends it a bleed, a normal head CT, a 3-slice series the
ICH model refuses, and a study whose patient is called `<script>alert(1)</script>`. The page
must list the positive above the negative, show "not analysed" with its reason, show the name
as text, refuse access without the token, and update without a reload. Screenshots go to
tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import TOKEN, RunningNode

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
EVIL = "<script>alert(1)</script>"
FINAL = {"done", "delivered", "not analysed"}

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM) or not have_dcmtk(),
                                reason="needs Debian's chromium and dcmtk")


def send(node: RunningNode, folder: Path, finding: str, seed: int, slices: int = 24,
         patient_name: str | None = None) -> str:
    files = write_ct_series(folder, finding=finding, slices=slices, seed=seed,
                            patient_name=patient_name)
    sent = run_storescu(files, ae="MODALITY", port=node.dicom_port, timeout=120)
    assert sent.returncode == 0, sent.output
    return pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID


@pytest.fixture(scope="module")
def studied_node(tmp_path_factory):
    """The node after it analysed four studies: {name: study uid}."""
    work = tmp_path_factory.mktemp("worklist")
    with RunningNode(work / "node") as node:
        studies = {
            "positive": send(node, work / "pos", "subdural", 9401, patient_name="Positiv^Paul"),
            "negative": send(node, work / "neg", "none", 9402, patient_name="Negativ^Nora"),
            "short": send(node, work / "short", "none", 9403, slices=3, patient_name="Kurz^Karl"),
            "evil": send(node, work / "evil", "none", 9404, patient_name=EVIL),
        }
        for uid in studies.values():
            node.wait_study_state(uid, FINAL, timeout=120)
        yield node, studies


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    yield pg
    context.close()


def login(page, base: str, wait_for_rows: bool = True) -> None:
    page.goto(base + "/")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    if wait_for_rows:
        page.wait_for_selector("#rows tr")


def row(page, uid: str):
    return page.locator(f'tr[data-study-uid="{uid}"]')


def test_without_token_browser_gets_login_form_and_api_gets_401(page, studied_node):
    node, _ = studied_node
    base = node.url
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    assert page.is_visible("#token")
    assert page.locator("#rows tr").count() == 0
    api = page.request.get(base + "/studies", headers={"Accept": "application/json"})
    assert api.status == 401
    page.fill("#token", "wrong-token")
    page.click("button[type=submit]")
    assert "not this node" in page.inner_text(".error")
    assert page.request.get(base + "/studies").status == 401


def test_login_then_positive_above_negative_not_analysed_reason_and_escaped_name(page, studied_node):
    node, uid = studied_node
    login(page, node.url)
    order = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.studyUid)")
    assert order.index(uid["positive"]) < order.index(uid["negative"])
    assert order[0] == uid["positive"]
    positive = row(page, uid["positive"]).inner_text()
    assert "Intracranial hemorrhage" in positive and "ich_ct" in positive and "%" in positive
    assert "No intracranial hemorrhage detected" in row(page, uid["negative"]).inner_text()
    short = row(page, uid["short"]).inner_text()
    assert "Not analysed" in short
    assert "3 slice" in short and "16" in short  # the reason, in words
    # The patient called <script>alert(1)</script> is shown as text and runs nothing.
    assert row(page, uid["evil"]).locator("a.patient").inner_text() == EVIL
    assert page.dialogs == []
    assert page.evaluate("document.querySelectorAll('#rows script').length") == 0
    # The key image of the positive study loads (same origin, behind the cookie).
    page.wait_for_function(f"""() => {{
        const i = document.querySelector('tr[data-study-uid="{uid["positive"]}"] img');
        return !!i && i.complete && i.naturalWidth > 0; }}""", timeout=15_000)
    status = page.request.get(node.url + "/status").json()  # the page's cookie is enough
    assert status["ready"] is True and all(c["ok"] for c in status["checks"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)


def test_a_new_study_appears_and_gets_its_verdict_without_reload(page, studied_node, tmp_path):
    node, _ = studied_node
    login(page, node.url)
    page.evaluate("window.__notReloaded = true")
    new_uid = send(node, tmp_path / "new", "epidural", 9405, patient_name="Neu^Nina")
    page.wait_for_selector(f'tr[data-study-uid="{new_uid}"]', timeout=30_000)
    page.wait_for_function(
        """uid => { const r = document.querySelector(`tr[data-study-uid="${uid}"]`);
                    return !!r && /hemorrhage/.test(r.innerText); }""",
        arg=new_uid, timeout=90_000)
    assert page.evaluate("window.__notReloaded") is True
    assert node.study(new_uid)["state"] in FINAL


def test_detail_view_of_the_positive_study(page, studied_node):
    node, uid = studied_node
    login(page, node.url)
    row(page, uid["positive"]).locator("a.patient").click()
    page.wait_for_url(f"{node.url}/view/{uid['positive']}")
    page.wait_for_selector("#study h1")
    text = page.inner_text("#study")
    assert "Positiv, Paul" in text and "ich_ct" in text
    assert page.dialogs == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
    page.click("a.logout")
    page.wait_for_selector("#token")


def test_a_node_with_no_destination_says_results_are_not_sent_anywhere(page, studied_node):
    """No destination, HL7 receiver or webhook: the start-up lines, GET /status, befund status
    and the worklist all say that results stay on the node."""
    node, _ = studied_node
    log = node.log_path.read_text(errors="replace")
    assert "befund: WARNING results are not sent anywhere" in log
    assert f"befund: worklist http://127.0.0.1:{node.http_port}/ ; API token set in the config" in log
    code, status = node.api("/status")
    assert code == 200 and status["deliveries"]["targets"] == []
    assert "not sent anywhere" in status["deliveries"]["notice"]
    cli = node.befund_status()
    assert cli.returncode == 0 and "WARNING  results are not sent anywhere" in cli.stdout
    login(page, node.url)
    notice = page.wait_for_selector("#delivery-notice", state="visible", timeout=10_000)
    assert "results are not sent anywhere" in notice.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "worklist-no-destination.png"), full_page=True)


def test_a_node_that_refuses_instances_says_so_to_probes_api_and_radiologists(page, tmp_path):
    """Spool below its watermark: every C-STORE is refused, so the node is not ready, says why
    on /readyz, GET /status and above the worklist, and stays alive (a restart would not help)."""
    with RunningNode(tmp_path / "node", min_free_bytes=1 << 62).start(until="/livez") as node:
        assert node.api("/readyz", token=None)[0] == 503
        assert node.api("/livez", token=None)[0] == 200
        assert node.api("/status", token=None)[0] == 401
        code, status = node.api("/status")
        assert code == 503 and status["ready"] is False and status["alive"] is True
        failing = {c["name"]: c["detail"] for c in status["checks"] if not c["ok"]}
        assert list(failing) == ["spool"] and "new instances are refused" in failing["spool"]
        cli = node.befund_status()
        assert cli.returncode == 1, cli.stderr
        assert "FAIL  spool" in cli.stdout and "NOT READY" in cli.stdout
        _, metrics = node.api("/metrics", token=None)
        lines = metrics.splitlines()
        assert "befund_node_ready 0.0" in lines  # one value for the node, not one per process
        assert 'befund_node_check_ok{check="spool"} 0.0' in lines
        assert 'befund_node_check_ok{check="dicom"} 1.0' in lines
        login(page, node.url, wait_for_rows=False)
        alert = page.wait_for_selector("#node-alert", state="visible", timeout=10_000)
        text = alert.inner_text()
        assert "not ready" in text and "spool" in text and "refused" in text
        assert page.inner_text("#empty") == "No studies yet."  # not "appear as the PACS sends them"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "worklist-node-not-ready.png"), full_page=True)
