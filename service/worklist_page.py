"""The radiologists' worklist: one row per study with the AI verdict, live, no external assets.

`worklist_routes(store)` returns Starlette routes for the page (`/`), a study's detail page
(`/view/{study_uid}`), its key images (`/studies/{study_uid}/key-image.png`, the first, and
`/studies/{study_uid}/key-images/{n}.png`), the shadow view (`/shadow`: shadow models' results
beside the active ones, by UID, for the `ml` role) and the CSS/JS in `service/static/`. Each
page checks the role (service/users.py): the `ml` role sees no patients' studies, and the
readers' pages never show a shadow model's result. Opening a
study is written to the audit log (service/audit_log.py). The pages poll the HTTP API
(`GET /studies`, `GET /studies/{uid}`) every 2 s, and `GET /status`, whose failing checks
show as an alert above the list (a node that cannot receive or analyse must not look like a
quiet day). They build the DOM with `textContent` only; the first paint comes from a JSON
data island in the page, escaped so that no value can close the script element. Patient data is shown,
never logged.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from service.web_access import principal, record

STATIC_DIR = Path(__file__).with_name("static")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
POLL_MS = 2000
MAX_KEY_IMAGES = 16  # per study; a card asks for a few

PAGE_HEADERS = {
    "content-security-policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    # No Referer leaves the node; its own POSTs keep their Origin (with no-referrer a browser
    # sends `Origin: null`, which the token gate's cross-site check refuses).
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


class WorklistSource(Protocol):
    """What the page reads; the node's state DB provides it (rows as in `GET /studies`)."""

    def studies(self) -> list[dict]: ...

    def study(self, study_uid: str) -> dict | None: ...

    def key_image_png(self, study_uid: str, index: int = 0) -> bytes | None: ...

    def shadow_studies(self) -> list[dict]: ...


def worklist_order(row: dict) -> tuple:
    """Positive findings first, then not analysed, then everything else; newest first within."""
    if row.get("present") is True:
        group = 0
    elif is_not_analysed(row):
        group = 1
    else:
        group = 2
    return (group, -(row.get("received_at") or 0))


def is_not_analysed(row: dict) -> bool:
    state = str(row.get("state") or "").lower().replace(" ", "_").replace("-", "_")
    return state == "not_analysed" or (row.get("present") is None and bool(row.get("reason"))
                                       and state in ("done", "delivered", "failed"))


def _data_island(element_id: str, data: Any) -> str:
    """JSON inside <script type="application/json">: <, > and & escaped so it cannot break out."""
    text = json.dumps(data, default=str, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script id="{element_id}" type="application/json">{text}</script>'


def _who(request: Request | None) -> tuple[str, str, str]:
    """(user, role, permissions) of the signed-in principal for the page's data attributes."""
    from service.users import COMMON, PERMISSIONS

    who = principal(request) if request is not None else None
    if who is None:
        return "", "", ""
    return who.name, who.role, " ".join(sorted(PERMISSIONS.get(who.role, frozenset()) | COMMON))


def _shell(title: str, page: str, body: str, data: Any, api: str, request: Request | None = None) -> str:
    user, role, may = _who(request)
    signed_in = (f'<span class="who" id="who">{html.escape(user)} ({html.escape(role)})</span>'
                 if user else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/worklist.css">
</head>
<body data-page="{html.escape(page, quote=True)}" data-api="{html.escape(api, quote=True)}"
 data-poll-ms="{POLL_MS}" data-user="{html.escape(user, quote=True)}"
 data-may="{html.escape(may, quote=True)}">
<header class="top">
 <a class="brand" href="/"><span class="logo">befund</span> AI worklist</a>
 <span id="live" class="live" title="updates every {POLL_MS // 1000} s">connecting</span>
 {signed_in}
 <a class="logout" href="/logout">Sign out</a>
</header>
<main>
<p id="node-alert" class="node-alert" role="alert" hidden></p>
<p id="delivery-notice" class="delivery-notice" role="status" hidden></p>
{body}
<noscript><p class="notice">This worklist needs JavaScript to update itself.</p></noscript>
</main>
<footer>AI results are preliminary and unverified; the radiologist's read decides.</footer>
{_data_island("initial-data", data)}
<script src="/static/worklist.js" defer></script>
</body></html>
"""


WORKLIST_BODY = """<section class="summary" aria-live="polite">
 <span id="count-positive" class="pill pill-positive">0 positive</span>
 <span id="count-unacknowledged" class="pill pill-positive">0 not yet acknowledged</span>
 <span id="count-not-analysed" class="pill pill-na">0 not analysed</span>
 <span id="count-total" class="pill">0 studies</span>
 <select id="show" aria-label="Show">
  <option value="all">All studies</option>
  <option value="unacknowledged">Positive, not yet acknowledged</option>
  <option value="positive">Positive</option>
  <option value="not-analysed">Not analysed</option>
 </select>
 <input id="filter" type="search" placeholder="Filter: patient, accession, modality"
  aria-label="Filter the worklist">
 <span id="updated" class="updated"></span>
</section>
<table class="worklist" id="worklist">
 <thead><tr>
  <th class="c-img">Key image</th><th>AI finding</th><th>Certainty</th><th>Patient</th>
  <th>Accession</th><th>Study date</th><th>Modality</th><th>Received</th><th>Result</th>
  <th>Model</th><th>State</th><th>Review</th>
 </tr></thead>
 <tbody id="rows"></tbody>
</table>
<p id="empty" class="empty" hidden>No studies yet. Studies appear here as the PACS sends them.</p>
<section id="dead-letters" class="dead-letters" hidden>
 <h2>Results that could not be delivered</h2>
 <p class="sub">Each waits here until it is sent again or discarded.</p>
 <table class="grid" id="dead-letter-table"><thead><tr>
  <th>Delivery</th><th>Study</th><th>To</th><th>Attempts</th><th>Last error</th><th>Since</th><th></th>
 </tr></thead><tbody id="dead-letter-rows"></tbody></table>
</section>
"""

NO_STUDIES_BODY = """<p class="notice" id="role-notice">The {role} role does not see patients' studies.
The loaded models and their validation figures are at <a href="/models">/models</a>.{shadow}</p>
"""
SHADOW_LINK = """ Shadow models' results beside the active ones are on the
<a href="/shadow">shadow view</a>."""

SHADOW_BODY = """<section class="summary" aria-live="polite">
 <span id="count-shadow" class="pill">0 shadow results</span>
 <span id="count-disagree" class="pill pill-positive">0 disagree</span>
 <span id="updated" class="updated"></span>
</section>
<p class="sub">Models in shadow mode run on the same series as the active version; their
results are kept here and in the shadow report (<code>GET /models/NAME/shadow-report</code>),
never delivered and never shown to radiologists. Studies are named by UID only.</p>
<table class="grid" id="shadow-table"><thead><tr>
 <th>Received</th><th>Study UID</th><th>Series UID</th><th>Model</th><th>Active</th><th>Shadow</th>
 <th>Agree</th>
</tr></thead><tbody id="shadow-rows"></tbody></table>
<p id="empty" class="empty" hidden>No shadow results yet.</p>
"""

DETAIL_BODY = """<p class="back"><a href="/">&larr; Worklist</a></p>
<section id="study" class="detail"></section>
"""


def _page(content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status, headers=PAGE_HEADERS)


def _not_found(what: str) -> HTMLResponse:
    body = f'<p class="back"><a href="/">&larr; Worklist</a></p><p class="notice">{html.escape(what)}</p>'
    return _page(_shell("befund - not found", "missing", body, None, ""), 404)


def worklist_routes(store: WorklistSource) -> list[BaseRoute]:
    """Routes for the worklist page, the detail page, key images and static assets."""

    def may_read(request: Request) -> bool:
        who = principal(request)
        return who is not None and who.may("read")

    def no_studies(request: Request) -> HTMLResponse:
        who = principal(request)
        body = NO_STUDIES_BODY.format(role=html.escape(who.role if who else "anonymous"),
                                      shadow=SHADOW_LINK if who is not None and who.may("shadow") else "")
        return _page(_shell("befund - AI worklist", "none", body, None, "", request), 403)

    async def worklist(request: Request) -> Response:
        if not may_read(request):
            return no_studies(request)
        rows = sorted(store.studies(), key=worklist_order)
        record(request, "view_worklist", detail=f"{len(rows)} studies")
        return _page(_shell("befund - AI worklist", "worklist", WORKLIST_BODY, {"studies": rows},
                            "/studies", request))

    async def detail(request: Request) -> Response:
        if not may_read(request):
            return no_studies(request)
        uid = request.path_params["study_uid"]
        study = store.study(uid) if UID_RE.match(uid) else None
        if study is None:
            return _not_found(f"Study {uid} is not on this node.")
        record(request, "view_study", uid)
        return _page(_shell("befund - study", "detail", DETAIL_BODY, study, f"/studies/{uid}", request))

    async def shadow(request: Request) -> Response:
        who = principal(request)
        if who is None or not who.may("shadow"):
            return no_studies(request)
        rows = store.shadow_studies()
        record(request, "view_shadow", detail=f"{len(rows)} shadow results")
        return _page(_shell("befund - shadow models", "shadow", SHADOW_BODY, {"rows": rows},
                            "/shadow/studies", request))

    async def key_image(request: Request) -> Response:
        if not may_read(request):
            return Response(b"", status_code=403)
        uid = request.path_params["study_uid"]
        index = int(request.path_params.get("index", 0))
        png = store.key_image_png(uid, index) if UID_RE.match(uid) and index < MAX_KEY_IMAGES else None
        if png is None:
            return Response(b"", status_code=404)
        return Response(png, media_type="image/png",
                        headers={"cache-control": "private, max-age=60", "x-content-type-options": "nosniff"})

    return [
        Route("/", worklist, methods=["GET"], name="worklist"),
        Route("/view/{study_uid}", detail, methods=["GET"], name="study_view"),
        Route("/shadow", shadow, methods=["GET"], name="shadow_view"),
        Route("/studies/{study_uid}/key-image.png", key_image, methods=["GET"], name="key_image"),
        Route("/studies/{study_uid}/key-images/{index:int}.png", key_image, methods=["GET"],
              name="key_images"),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
