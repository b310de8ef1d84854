"""The administrator's HTTP routes: the audit log (query and JSON-lines export) and the
node's effective configuration with its secrets left out. Each checks the role
(service/users.py) and is itself written to the audit log.
"""

from __future__ import annotations

import dataclasses
import math

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.audit_log import MAX_ROWS, AuditLog
from service.http_api import UID_RE, PatientJSON
from service.node import current_node
from service.web_access import denied, record

SECRET_KEYS = frozenset({"token", "database_url"})
DELIVERY_STATES = ("dead", "pending", "delivered", "discarded")
_TEXT_FILTERS = ("user", "action", "study_uid")


def _audit_filters(request: Request) -> dict | str:
    """The query's filters, or what is wrong with them."""
    params = request.query_params
    out: dict = {}
    for name in _TEXT_FILTERS:
        value = params.get(name)
        if value:
            if len(value) > 64 or (name == "study_uid" and not UID_RE.match(value)):
                return f"{name} is not a valid filter value"
            out[name] = value
    for name in ("since", "until"):
        if params.get(name):
            try:
                out[name] = float(params[name])
            except ValueError:
                return f"{name} must be seconds since 1970 (e.g. 1735689600)"
            if not math.isfinite(out[name]):
                return f"{name} must be a finite number"
    return out


def _audit_log(request: Request) -> AuditLog:
    return request.scope.get("befund.audit") or AuditLog(current_node().db)


async def query_audit(request: Request) -> Response:
    """GET /audit?user=&study_uid=&action=&since=&until=&limit=: entries oldest first."""
    if refused := denied(request, "audit"):
        return refused
    filters = _audit_filters(request)
    if isinstance(filters, str):
        return PatientJSON({"error": filters}, status_code=400)
    try:
        limit = min(int(request.query_params.get("limit", "1000")), MAX_ROWS)
    except ValueError:
        return PatientJSON({"error": "limit must be a whole number"}, status_code=400)
    rows = _audit_log(request).query(limit=limit, **filters)
    record(request, "view_audit", filters.get("study_uid"), detail=f"{len(rows)} entries")
    return PatientJSON({"entries": rows})


async def export_audit(request: Request) -> Response:
    """GET /audit.jsonl: every matching entry, one JSON object per line (for the DPO)."""
    if refused := denied(request, "audit"):
        return refused
    filters = _audit_filters(request)
    if isinstance(filters, str):
        return PatientJSON({"error": filters}, status_code=400)
    record(request, "export_audit", filters.get("study_uid"))
    return StreamingResponse(_audit_log(request).export_lines(**filters),
                             media_type="application/x-ndjson",
                             headers={"cache-control": "no-store",
                                      "content-disposition": 'attachment; filename="befund-audit.jsonl"'})


async def list_deliveries(request: Request) -> Response:
    """GET /deliveries?state=dead: the dead letters (or another state) for the admin's view."""
    if refused := denied(request, "resend"):
        return refused
    state = request.query_params.get("state", "dead")
    if state not in DELIVERY_STATES:
        return PatientJSON({"error": f"state must be one of {', '.join(DELIVERY_STATES)}"}, status_code=400)
    rows = current_node().db.deliveries_in_state(state)
    record(request, "view_deliveries", detail=f"{len(rows)} {state}")
    return PatientJSON({"deliveries": rows})


async def discard_delivery(request: Request) -> Response:
    """POST /deliveries/{id}/discard: never send this one (a dead letter nobody needs)."""
    if refused := denied(request, "discard"):
        return refused
    try:
        delivery_id = int(request.path_params["delivery_id"])
    except ValueError:
        return PatientJSON({"error": "delivery id must be a number"}, status_code=400)
    node = current_node()
    row = node.db.delivery(delivery_id)
    if row is None or not node.db.discard_delivery(delivery_id):
        return PatientJSON({"error": f"delivery {delivery_id} is not dead or pending here"}, status_code=404)
    job = node.db.job(row.job_id)
    record(request, "discard_delivery", job.study_uid if job else None, detail=f"delivery {delivery_id}")
    return PatientJSON({"id": delivery_id, "state": "discarded"})


def redacted_config() -> dict:
    """The running node's config as data, secrets replaced by whether they are set."""
    config = dataclasses.asdict(current_node().config)
    for key in SECRET_KEYS:
        config[key] = "(set)" if config.get(key) else ""
    return config


async def view_config(request: Request) -> Response:
    if refused := denied(request, "config"):
        return refused
    record(request, "view_config")
    return PatientJSON({"config": redacted_config()})


ADMIN_ROUTES = [
    Route("/audit", query_audit, methods=["GET"]),
    Route("/audit.jsonl", export_audit, methods=["GET"]),
    Route("/config", view_config, methods=["GET"]),
    Route("/deliveries", list_deliveries, methods=["GET"]),
    Route("/deliveries/{delivery_id}/discard", discard_delivery, methods=["POST"]),
]
