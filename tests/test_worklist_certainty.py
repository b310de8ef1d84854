"""The worklist never shows a certainty of "100 %": above 99 % it reads ">99%".

The page is served by uvicorn over the in-memory worklist source of test_worklist_page.py and
rendered in Debian's Chromium (Playwright), as a radiologist sees it.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from tests.dicom_peers import free_port
from tests.node_harness import poll
from tests.test_worklist_page import TOKEN, _row, demo_app

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium")

CERTAINTIES = {"1.2.9.1": 1.0, "1.2.9.2": 0.9996, "1.2.9.3": 0.995, "1.2.9.4": 0.99, "1.2.9.5": 0.874}


@pytest.fixture(scope="module")
def served():
    rows = [_row(uid, present=True, certainty=c, patient_name=f"Sicher^{i}", accession=f"ACC{i}")
            for i, (uid, c) in enumerate(CERTAINTIES.items())]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(demo_app(rows), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started, 30, 0.05, "uvicorn serving the worklist")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_worklist_shows_more_than_99_percent_never_100(served):
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(served + "/")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#rows tr")
            shown = {uid: page.locator(f'tr[data-study-uid="{uid}"]').inner_text() for uid in CERTAINTIES}
        finally:
            browser.close()
    assert all("100%" not in text for text in shown.values()), shown
    for uid in ("1.2.9.1", "1.2.9.2", "1.2.9.3"):
        assert ">99%" in shown[uid], shown[uid]
    assert "99%" in shown["1.2.9.4"] and ">99%" not in shown["1.2.9.4"]
    assert "87%" in shown["1.2.9.5"]
