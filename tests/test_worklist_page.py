"""The worklist page and the token gate, through Starlette's test client (no browser).

`demo_app()`: the worklist routes over an in-memory source, plus `GET /studies` and
`GET /studies/{uid}` as the node's HTTP API answers them. These tests pin what a browser test
on the real node (test_worklist_browser.py) cannot reach cheaply: cookie flags, off-site
redirects, the CSP and the escaped data island.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pipelines.thumbnails import render_ct_png
from service.auth import COOKIE, TokenAuth
from service.worklist_page import worklist_order, worklist_routes

TOKEN = "test-token-0123456789abcdef"
EVIL = "<script>alert(1)</script>"


def _row(uid: str, **kw) -> dict:
    row = {"study_uid": uid, "patient_name": "Muster^Anna", "patient_id": "P1", "accession": "A1",
           "study_date": "20250304", "modality": "CT", "received_at": time.time() - 600,
           "updated_at": time.time() - 60, "state": "delivered", "reason": "", "model": "ich-ct",
           "model_version": "1.0.0", "run": 1, "present": False, "certainty": 0.91, "score": 0.09,
           "priority": "normal", "key_image": None, "series_count": 1, "instance_count": 32}
    row.update(kw)
    return row


def sample_rows() -> list[dict]:
    now = time.time()
    return [
        _row("1.2.3.1", patient_name="Negativ^Nora", accession="ACC-NEG", received_at=now - 30),
        _row("1.2.3.2", patient_name="Positiv^Paul", accession="ACC-POS", present=True, certainty=0.97,
             score=0.97, priority="high", received_at=now - 900, key_image="/studies/1.2.3.2/key-image.png"),
        _row("1.2.3.3", patient_name="Kurz^Karl", accession="ACC-NA", present=None, certainty=None,
             score=None, state="not_analysed", model="ich-ct",
             reason="1 slice, the ICH model needs at least 16", received_at=now - 300),
        _row("1.2.3.4", patient_name=EVIL, accession="ACC-XSS", state="running", present=None,
             certainty=None, received_at=now - 10, model="", model_version=""),
        _row("1.2.3.5", patient_name="Laufend^Lea", accession="ACC-FAIL", state="delivery_failed",
             present=False, certainty=0.8, reason="PACS@10.0.0.5:104 refused the association",
             received_at=now - 2000),
    ]


class MemorySource:
    """An in-memory WorklistSource, as the state DB would answer."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = {r["study_uid"]: r for r in rows}

    def studies(self) -> list[dict]:
        return list(self.rows.values())

    def study(self, study_uid: str) -> dict | None:
        row = self.rows.get(study_uid)
        if row is None:
            return None
        return dict(row, series=[{"series_uid": study_uid + ".1", "modality": row["modality"],
                                  "description": "Head " + EVIL, "instance_count": 32, "state": "done"}],
                    jobs=[{"id": 11, "series_uid": study_uid + ".1", "model": row["model"],
                           "model_version": row["model_version"], "run": 1, "state": "done", "attempts": 1,
                           "last_error": "", "present": row["present"], "certainty": row["certainty"],
                           "reason": row["reason"],
                           "timings": {"load": 0.41, "preprocess": 1.2, "infer": 2.3}}],
                    deliveries=[{"id": 21, "job_id": 11, "destination": "pacs", "kind": "dicom",
                                 "state": "delivered", "attempts": 1, "last_error": "",
                                 "next_attempt_at": None}])

    def key_image_png(self, study_uid: str, index: int = 0) -> bytes | None:
        if index or study_uid not in self.rows or not self.rows[study_uid].get("key_image"):
            return None
        yy, xx = np.mgrid[-128:128, -128:128]
        slice_hu = np.where(xx**2 + (yy / 1.2) ** 2 < 100**2, 35.0, -1000.0)
        slice_hu[(xx - 30) ** 2 + (yy + 20) ** 2 < 15**2] = 70.0  # a bright bleed
        return render_ct_png(slice_hu)


def demo_app(rows: list[dict] | None = None, token: str = TOKEN) -> TokenAuth:
    store = MemorySource(sample_rows() if rows is None else rows)

    async def list_studies(request: Request) -> JSONResponse:
        return JSONResponse({"studies": store.studies()})

    async def one_study(request: Request) -> JSONResponse:
        study = store.study(request.path_params["study_uid"])
        return JSONResponse(study) if study else JSONResponse({"error": "not found"}, status_code=404)

    routes = [*worklist_routes(store), Route("/studies", list_studies),
              Route("/studies/{study_uid}", one_study)]
    app = Starlette(routes=routes)
    app.state.store = store
    return TokenAuth(app, token)


@pytest.fixture()
def client():
    with TestClient(demo_app(), base_url="http://testserver") as c:
        yield c


def _auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_api_without_token_is_401_json(client):
    res = client.get("/studies", headers={"Accept": "application/json"})
    assert res.status_code == 401
    assert res.json()["error"] == "unauthorised"
    assert res.headers["www-authenticate"].startswith("Bearer")


def test_browser_without_token_is_sent_to_login(client):
    res = client.get("/view/1.2.3.2", headers={"Accept": "text/html"}, follow_redirects=False)
    assert res.status_code == 303
    assert res.headers["location"] == "/login?next=%2Fview%2F1.2.3.2"
    page = client.get(res.headers["location"])
    assert page.status_code == 200 and 'name="token"' in page.text
    assert 'value="/view/1.2.3.2"' in page.text


def test_wrong_token_is_refused(client):
    assert client.get("/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
    res = client.post("/login", data={"token": "nope"}, follow_redirects=False)
    assert res.status_code == 401 and "not this node" in res.text
    assert "set-cookie" not in res.headers


def test_login_sets_strict_httponly_cookie_and_redirects(client):
    res = client.post("/login", data={"token": TOKEN, "next": "/view/1.2.3.2"}, follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/view/1.2.3.2"
    cookie = res.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/studies").status_code == 200  # the client keeps the cookie
    out = client.get("/logout", follow_redirects=False)
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]


def test_login_never_redirects_off_site(client):
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        res = client.post("/login", data={"token": TOKEN, "next": target}, follow_redirects=False)
        assert res.headers["location"] == "/"


def test_open_paths_need_no_token(client):
    assert client.get("/static/worklist.css").status_code == 200
    assert client.get("/static/worklist.js").status_code == 200
    assert client.get("/healthz").status_code == 404  # open, but not ours: the app answers


def test_bearer_token_opens_page_and_escapes_data(client):
    res = client.get("/", headers=_auth())
    assert res.status_code == 200
    assert "default-src 'self'" in res.headers["content-security-policy"]
    assert res.headers["cache-control"] == "no-store"
    assert EVIL not in res.text  # the data island cannot close its <script>
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in res.text
    assert not re.search(r"https?://", res.text)  # no external assets


def test_page_data_is_sorted_positive_first_then_not_analysed():
    rows = sorted(sample_rows(), key=worklist_order)
    assert [r["accession"] for r in rows[:2]] == ["ACC-POS", "ACC-NA"]


def test_detail_page_and_key_image(client):
    res = client.get("/view/1.2.3.2", headers=_auth())
    assert res.status_code == 200 and "ACC-POS" in res.text
    img = client.get("/studies/1.2.3.2/key-image.png", headers=_auth())
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content.startswith(b"\x89PNG")
    assert client.get("/studies/1.2.3.1/key-image.png", headers=_auth()).status_code == 404
    assert client.get("/view/9.9.9", headers=_auth()).status_code == 404
    missing = client.get("/view/not-a-uid<b>", headers=_auth())
    assert missing.status_code == 404 and "<b>" not in missing.text
