"""The HTTP API (JSON) of the gateway. Health and readiness are BentoML's own routes;
`/metrics` is befund's (open, like the probes); everything else needs the token or a
signed-in account, and each route checks the role's permission (service/users.py) and writes
the audit entry for what it showed or changed (service/audit_log.py).

Every JSON answer says `Cache-Control: no-store`: study rows hold patient names, and neither
a browser's disk cache nor a proxy may keep them.
"""

from __future__ import annotations

import os
import re

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.flag_reviews import add_review, latest_reviews
from service.node import current_node
from service.node_checks import status
from service.reader_rows import reader_rows
from service.study_status import all_study_rows, study_detail
from service.web_access import denied, principal, record

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
REVIEWED = {"acknowledge": "acknowledged", "dismiss": "dismissed"}


class PatientJSON(JSONResponse):
    """A JSON answer that no cache keeps (it may name patients)."""

    def __init__(self, content: object, status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code, headers={"cache-control": "no-store"})


def worklist_order(row: dict) -> tuple:
    """Positive findings first, then studies not analysed, then the rest; newest first in each."""
    rank = 0 if row["present"] else 1 if row["state"] == "not analysed" else 2
    return (rank, -(row["received_at"] or 0))


def sorted_study_rows() -> list[dict]:
    node = current_node()
    rows = reader_rows(all_study_rows(node.db, node.config.settle_s), node.db, node.cards,
                       node.config.viewer_url, latest_reviews(node.db))
    return sorted(rows, key=worklist_order)


def reader_detail(study_uid: str, with_shadow: bool = False) -> dict | None:
    """One study with its series, jobs and deliveries, in the reader's words; shadow models'
    jobs only `with_shadow` (for those who may see them, never on the reader's page)."""
    node = current_node()
    detail = study_detail(node.db, study_uid, node.config.settle_s, with_shadow)
    if detail is not None:
        from service.worklist_source import NodeWorklistSource

        reader_rows([detail], node.db, node.cards, node.config.viewer_url,
                    latest_reviews(node.db, study_uid))
        detail["key_image_views"] = NodeWorklistSource().key_image_views(study_uid)
    return detail


def _uid(request: Request) -> str | None:
    uid = request.path_params["study_uid"]
    return uid if len(uid) <= 64 and UID_RE.match(uid) else None


async def list_studies(request: Request) -> PatientJSON:
    if refused := denied(request, "read"):
        return refused
    rows = sorted_study_rows()
    record(request, "view_worklist", detail=f"{len(rows)} studies")
    return PatientJSON({"studies": rows})


async def get_study(request: Request) -> PatientJSON:
    if refused := denied(request, "read"):
        return refused
    uid = _uid(request)
    if uid is None:
        return PatientJSON({"error": "not a valid DICOM UID"}, status_code=400)
    who = principal(request)
    detail = reader_detail(uid, with_shadow=who is not None and who.may("shadow"))
    if detail is None:
        return PatientJSON({"error": f"study {uid} is not known here"}, status_code=404)
    record(request, "view_study", uid)
    return PatientJSON(detail)


async def run_study(request: Request) -> PatientJSON:
    """Start a run of the study's series, or say why not: 202 when at least one series runs
    (or completes now), 409 with each series' reason when none does (a run already queued or
    running; nothing new since the last run, which `{"force": true}` overrides; no model)."""
    if refused := denied(request, "run"):
        return refused
    uid = _uid(request)
    if uid is None:
        return PatientJSON({"error": "not a valid DICOM UID"}, status_code=400)
    try:
        body = await request.json() if await request.body() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
        return PatientJSON({"error": 'the body, if any, is {"force": true|false}'}, status_code=400)
    answers = current_node().request_run(uid, force=body.get("force", False))
    if answers is None:
        return PatientJSON({"error": f"study {uid} is not known here"}, status_code=404)
    series = [{"series_uid": a.series_uid, "runs": a.runs, "reason": a.reason} for a in answers]
    if not any(a.runs for a in answers):
        reasons = "; ".join(f"series {a.series_uid}: {a.reason}" for a in answers)
        return PatientJSON({"error": f"nothing to run for study {uid}: {reasons}",
                             "study_uid": uid, "series": series}, status_code=409)
    record(request, "run_study", uid)
    return PatientJSON({"study_uid": uid, "series": series, "state": "queued"}, status_code=202)


async def review_flag(request: Request) -> PatientJSON:
    """POST /studies/{uid}/acknowledge or /dismiss: the signed-in reader saw this result."""
    if refused := denied(request, "acknowledge"):
        return refused
    uid = _uid(request)
    if uid is None:
        return PatientJSON({"error": "not a valid DICOM UID"}, status_code=400)
    action = request.url.path.rsplit("/", 1)[1]  # the route says which: acknowledge or dismiss
    node = current_node()
    detail = study_detail(node.db, uid, node.config.settle_s)
    if detail is None:
        return PatientJSON({"error": f"study {uid} is not known here"}, status_code=404)
    if detail["present"] is None:
        return PatientJSON({"error": f"study {uid} has no AI result to {action}"}, status_code=409)
    who = principal(request)
    review = add_review(node.db, uid, REVIEWED[action], who.name, detail)
    record(request, action, uid, detail=f"{detail['model']} {detail['model_version']} run {detail['run']}")
    return PatientJSON({"study_uid": uid, "review": review})


def _delivery_id(request: Request) -> int | None:
    try:
        return int(request.path_params["delivery_id"])
    except ValueError:
        return None


async def resend_delivery(request: Request) -> PatientJSON:
    if refused := denied(request, "resend"):
        return refused
    delivery_id = _delivery_id(request)
    if delivery_id is None:
        return PatientJSON({"error": "delivery id must be a number"}, status_code=400)
    node = current_node()
    row = node.db.delivery(delivery_id)
    if row is None or not node.resend(delivery_id):
        return PatientJSON({"error": f"delivery {delivery_id} not found"}, status_code=404)
    job = node.db.job(row.job_id)
    record(request, "resend_delivery", job.study_uid if job else None, detail=f"delivery {delivery_id}")
    return PatientJSON({"id": delivery_id, "state": "pending"}, status_code=202)


async def list_models(request: Request) -> PatientJSON:
    if refused := denied(request, "models"):
        return refused
    node = current_node()
    return PatientJSON({
        "models": [{"key": c.key, "name": c.name, "version": c.version, "task": c.task,
                    "mode": c.mode, "supersedes": c.supersedes,
                    "intended_use": c.intended_use, "validation": c.validation}
                   for c in node.cards],
        "refused": [{"folder": folder, "error": error}
                    for folder, error in node.card_errors.items()],
        "not_run": [{"folder": folder, "reason": why} for folder, why in node.retired.items()]})


async def node_status(request: Request) -> PatientJSON:
    """Ready, alive and each part's check with the reason it fails (what /readyz only counts)."""
    if refused := denied(request, "status"):
        return refused
    from service.delivery_rules import summary

    node = current_node()
    body = status(node.checks())
    body["deliveries"] = summary(node.config)  # "results are not sent anywhere" when so
    return PatientJSON(body, status_code=200 if body["ready"] else 503)


async def who_am_i(request: Request) -> PatientJSON:
    """The signed-in principal and what it may do (the worklist shows buttons by this)."""
    from service.users import COMMON, PERMISSIONS

    who = principal(request)
    if who is None:
        return PatientJSON({"error": "unauthorised"}, status_code=401)
    return PatientJSON({"user": who.name, "role": who.role,
                        "permissions": sorted(PERMISSIONS.get(who.role, frozenset()) | COMMON)})


async def answered_by_token_gate(request: Request) -> PatientJSON:
    """Never reached: the token gate (service/auth.py) answers /login and /logout itself. The
    routes exist because BentoML's mount passes a path to this app only when a route matches."""
    return PatientJSON({"error": "not found"}, status_code=404)


def _metrics_text() -> bytes:
    """Every process's `befund_*` metrics (the model service's too) when BentoML runs them in
    multiprocess mode, else this process's registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text. Labels are route templates, model keys and states, never request text or
    UIDs; BentoML's own per-path HTTP metrics are off for the gateway (service/gateway.py)."""
    return Response(await anyio.to_thread.run_sync(_metrics_text), media_type=CONTENT_TYPE_LATEST,
                    headers={"cache-control": "no-store"})


API_ROUTES = [
    Route("/studies", list_studies, methods=["GET"]),
    Route("/studies/{study_uid}", get_study, methods=["GET"]),
    Route("/studies/{study_uid}/run", run_study, methods=["POST"]),
    Route("/studies/{study_uid}/acknowledge", review_flag, methods=["POST"]),
    Route("/studies/{study_uid}/dismiss", review_flag, methods=["POST"]),
    Route("/deliveries/{delivery_id}/resend", resend_delivery, methods=["POST"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/status", node_status, methods=["GET"]),
    Route("/me", who_am_i, methods=["GET"]),
    Route("/metrics", prometheus_metrics, methods=["GET"]),
    Route("/login", answered_by_token_gate, methods=["GET", "HEAD", "POST"]),
    Route("/logout", answered_by_token_gate, methods=["GET", "HEAD", "POST"]),
]


class _LazyTokenGate:
    """Checks the token of the node that runs in this process (known only after start-up)."""

    def __init__(self, app):
        self.app = app
        self._gate = None

    async def __call__(self, scope, receive, send):
        if self._gate is None:
            from service.audit_log import AuditLog
            from service.auth import TokenAuth
            from service.users import UserStore

            node = current_node()
            config = node.config
            self._gate = TokenAuth(
                self.app, node.token, failures_per_minute=config.http_auth_failures_per_minute,
                session_s=config.http_session_hours * 3600, max_sessions=config.http_max_sessions,
                secure_cookie=config.http_tls.enabled, accounts=UserStore(node.db),
                audit=AuditLog(node.db, config.audit_view_window_s))
        await self._gate(scope, receive, send)


def build_app() -> Starlette:
    from service.admin_api import ADMIN_ROUTES
    from service.shadow_api import SHADOW_ROUTES
    from service.worklist_page import worklist_routes
    from service.worklist_source import NodeWorklistSource

    app = Starlette(routes=API_ROUTES + ADMIN_ROUTES + SHADOW_ROUTES
                    + worklist_routes(NodeWorklistSource()))
    app.add_middleware(_LazyTokenGate)
    return app
