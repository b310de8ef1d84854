"""The HTTP API (JSON) of the gateway. Health, readiness and metrics are BentoML's own routes;
everything here needs the token."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.node import current_node
from service.node_checks import status
from service.study_status import all_study_rows, study_detail

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def worklist_order(row: dict) -> tuple:
    """Positive findings first, then studies not analysed, then the rest; newest first in each."""
    rank = 0 if row["present"] else 1 if row["state"] == "not analysed" else 2
    return (rank, -(row["received_at"] or 0))


def sorted_study_rows() -> list[dict]:
    node = current_node()
    return sorted(all_study_rows(node.db, node.config.settle_s), key=worklist_order)


def _uid(request: Request) -> str | None:
    uid = request.path_params["study_uid"]
    return uid if len(uid) <= 64 and UID_RE.match(uid) else None


async def list_studies(request: Request) -> JSONResponse:
    return JSONResponse({"studies": sorted_study_rows()})


async def get_study(request: Request) -> JSONResponse:
    uid = _uid(request)
    if uid is None:
        return JSONResponse({"error": "not a valid DICOM UID"}, status_code=400)
    node = current_node()
    detail = study_detail(node.db, uid, node.config.settle_s)
    if detail is None:
        return JSONResponse({"error": f"study {uid} is not known here"}, status_code=404)
    return JSONResponse(detail)


async def run_study(request: Request) -> JSONResponse:
    """Start a run of the study's series, or say why not: 202 when at least one series runs
    (or completes now), 409 with each series' reason when none does (a run already queued or
    running; nothing new since the last run, which `{"force": true}` overrides; no model)."""
    uid = _uid(request)
    if uid is None:
        return JSONResponse({"error": "not a valid DICOM UID"}, status_code=400)
    try:
        body = await request.json() if await request.body() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
        return JSONResponse({"error": 'the body, if any, is {"force": true|false}'}, status_code=400)
    answers = current_node().request_run(uid, force=body.get("force", False))
    if answers is None:
        return JSONResponse({"error": f"study {uid} is not known here"}, status_code=404)
    series = [{"series_uid": a.series_uid, "runs": a.runs, "reason": a.reason} for a in answers]
    if not any(a.runs for a in answers):
        reasons = "; ".join(f"series {a.series_uid}: {a.reason}" for a in answers)
        return JSONResponse({"error": f"nothing to run for study {uid}: {reasons}",
                             "study_uid": uid, "series": series}, status_code=409)
    return JSONResponse({"study_uid": uid, "series": series, "state": "queued"}, status_code=202)


async def resend_delivery(request: Request) -> JSONResponse:
    try:
        delivery_id = int(request.path_params["delivery_id"])
    except ValueError:
        return JSONResponse({"error": "delivery id must be a number"}, status_code=400)
    if not current_node().resend(delivery_id):
        return JSONResponse({"error": f"delivery {delivery_id} not found"}, status_code=404)
    return JSONResponse({"id": delivery_id, "state": "pending"}, status_code=202)


async def list_models(request: Request) -> JSONResponse:
    node = current_node()
    return JSONResponse({
        "models": [{"key": c.key, "name": c.name, "version": c.version, "task": c.task,
                    "intended_use": c.intended_use, "validation": c.validation}
                   for c in node.cards],
        "refused": [{"folder": folder, "error": error}
                    for folder, error in node.card_errors.items()]})


async def node_status(request: Request) -> JSONResponse:
    """Ready, alive and each part's check with the reason it fails (what /readyz only counts)."""
    body = status(current_node().checks())
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


async def answered_by_token_gate(request: Request) -> JSONResponse:
    """Never reached: the token gate (service/auth.py) answers /login and /logout itself. The
    routes exist because BentoML's mount passes a path to this app only when a route matches."""
    return JSONResponse({"error": "not found"}, status_code=404)


API_ROUTES = [
    Route("/studies", list_studies, methods=["GET"]),
    Route("/studies/{study_uid}", get_study, methods=["GET"]),
    Route("/studies/{study_uid}/run", run_study, methods=["POST"]),
    Route("/deliveries/{delivery_id}/resend", resend_delivery, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/status", node_status, methods=["GET"]),
    Route("/login", answered_by_token_gate, methods=["GET", "HEAD", "POST"]),
    Route("/logout", answered_by_token_gate, methods=["GET", "HEAD"]),
]


class _LazyTokenGate:
    """Checks the token of the node that runs in this process (known only after start-up)."""

    def __init__(self, app):
        self.app = app
        self._gate = None

    async def __call__(self, scope, receive, send):
        if self._gate is None:
            from service.auth import TokenAuth

            self._gate = TokenAuth(self.app, current_node().token)
        await self._gate(scope, receive, send)


def build_app() -> Starlette:
    from service.worklist_page import worklist_routes
    from service.worklist_source import NodeWorklistSource

    app = Starlette(routes=API_ROUTES + worklist_routes(NodeWorklistSource()))
    app.add_middleware(_LazyTokenGate)
    return app
