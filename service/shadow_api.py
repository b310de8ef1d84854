"""The shadow side of the HTTP API, for the `ml` role (and the machine token): the shadow
report per model (`GET /models/{name}/shadow-report?since=...`) and the shadow view's rows
(`GET /shadow/studies?since=...`). Both name studies by UID only; neither is open to the
radiologist or admin roles, whose views never show shadow results (service/study_status.py).
"""

from __future__ import annotations

import time

import anyio
from starlette.requests import Request
from starlette.routing import Route

from service.http_api import PatientJSON
from service.node import current_node
from service.shadow_report import ReportError, parse_since, shadow_report, shadow_rows
from service.web_access import denied, record


async def model_shadow_report(request: Request) -> PatientJSON:
    if refused := denied(request, "shadow"):
        return refused
    name = request.path_params["name"]
    try:
        since = parse_since(request.query_params.get("since"), time.time())
        report = await anyio.to_thread.run_sync(shadow_report, current_node().db, name, since)
    except ReportError as exc:
        return PatientJSON({"error": str(exc)}, status_code=400)
    record(request, "view_shadow_report", detail=name)
    return PatientJSON(report)


async def shadow_studies(request: Request) -> PatientJSON:
    if refused := denied(request, "shadow"):
        return refused
    try:
        since = parse_since(request.query_params.get("since"), time.time())
    except ReportError as exc:
        return PatientJSON({"error": str(exc)}, status_code=400)
    rows = await anyio.to_thread.run_sync(shadow_rows, current_node().db, since)
    record(request, "view_shadow", detail=f"{len(rows)} shadow results")
    return PatientJSON({"rows": rows})


SHADOW_ROUTES = [
    Route("/models/{name}/shadow-report", model_shadow_report, methods=["GET"]),
    Route("/shadow/studies", shadow_studies, methods=["GET"]),
]
