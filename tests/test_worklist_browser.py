"""The worklist in a real browser (Debian's Chromium driven by Playwright, offline).

Served by uvicorn: the worklist routes and the token gate over an in-memory study source with
the same JSON as the node's `GET /studies` (see `test_worklist_page.demo_app`). Screenshots go
to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from tests.dicom_peers import free_port
from tests.test_worklist_page import EVIL, TOKEN, _row, demo_app

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def server():
    app = demo_app()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)  # poll under a deadline
    yield f"http://127.0.0.1:{port}", app.app.state.store
    srv.should_exit = True
    thread.join(10)


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


def login(page, base: str) -> None:
    page.goto(base + "/")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    page.wait_for_selector("#rows tr")


def test_without_token_browser_gets_login_form_and_api_gets_401(page, server):
    base, _ = server
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    assert page.is_visible("#token")
    api = page.request.get(base + "/studies", headers={"Accept": "application/json"})
    assert api.status == 401 and api.json()["error"] == "unauthorised"
    page.fill("#token", "wrong-token")
    page.click("button[type=submit]")
    assert "not this node" in page.inner_text(".error")
    assert page.request.get(base + "/studies").status == 401


def test_login_then_worklist_orders_flags_and_escapes(page, server):
    base, _ = server
    login(page, base)
    order = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.studyUid)")
    assert order[0] == "1.2.3.2"  # the positive study first
    assert order[1] == "1.2.3.3"  # then the one not analysed
    assert order.index("1.2.3.2") < order.index("1.2.3.1")  # positive above negative
    positive = page.locator('tr[data-study-uid="1.2.3.2"]')
    assert "Present" in positive.inner_text() and "97%" in positive.inner_text()
    negative = page.locator('tr[data-study-uid="1.2.3.1"]')
    assert "Absent" in negative.inner_text()
    na = page.locator('tr[data-study-uid="1.2.3.3"]')
    assert "Not analysed" in na.inner_text()
    assert "1 slice, the ICH model needs at least 16" in na.inner_text()
    failed = page.locator('tr[data-study-uid="1.2.3.5"]')
    assert "Delivery failed" in failed.inner_text()
    # A patient called <script>alert(1)</script> is shown as text and runs nothing.
    evil = page.locator('tr[data-study-uid="1.2.3.4"] a.patient')
    assert evil.inner_text() == EVIL
    assert page.dialogs == []
    assert page.evaluate("document.querySelectorAll('#rows script').length") == 0
    # The key image of the positive study loads (same origin, behind the cookie).
    assert page.evaluate("""() => { const i = document.querySelector('tr[data-study-uid="1.2.3.2"] img');
                                    return i && i.complete && i.naturalWidth > 0; }""")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)


def test_worklist_updates_without_reload(page, server):
    base, store = server
    login(page, base)
    page.evaluate("window.__notReloaded = true")
    store.rows["1.2.3.9"] = _row("1.2.3.9", patient_name="Neu^Nina", accession="ACC-NEW", present=True,
                                 certainty=0.99, received_at=time.time())
    try:
        page.wait_for_selector('tr[data-study-uid="1.2.3.9"]', timeout=8000)
        assert page.evaluate("window.__notReloaded") is True
        order = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.studyUid)")
        assert order[:2] == ["1.2.3.9", "1.2.3.2"]  # the newest positive on top
    finally:
        del store.rows["1.2.3.9"]


def test_detail_view_shows_series_jobs_deliveries(page, server):
    base, _ = server
    login(page, base)
    page.click('tr[data-study-uid="1.2.3.2"] a.patient')
    page.wait_for_url(base + "/view/1.2.3.2")
    page.wait_for_selector("#study h1")
    text = page.inner_text("#study")
    assert "Positiv, Paul" in text and "ACC-POS" in text
    assert "Head <script>alert(1)</script>" in text  # series description, as text
    assert "infer 2.30 s" in text and "delivered" in text
    assert page.dialogs == []
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
    page.click("a.logout")
    page.wait_for_selector("#token")
