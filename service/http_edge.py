"""The gateway's HTTP edge: the first befund code every request meets, around BentoML's routes.

- Bounds. A request target (path and query) over `http_max_target_bytes` is answered 414 and
  request headers over `http_max_header_bytes` 431, before any route, token check, log line
  or metric sees them. uvicorn's h11 parser refuses only an *incomplete* request head over
  16 KiB; a head that arrives whole in one read (64 KiB) reaches the app, and BentoML 1.4
  passes no h11 option through (`h11_max_incomplete_event_size`), so the bound is here.
- Metrics by route template. `befund_http_requests_total{route, method, status}` and the
  duration histogram carry the template of the route that answered (`/studies/{study_uid}`),
  `unmatched` when none did. BentoML's own HTTP metrics and access log are off for the
  gateway (service/gateway.py): they label and log the raw path, and every new label value
  stayed in memory and in `/metrics` for good (300 requests with long paths: +128 MB).
- Access log. One line per request with the client address, the path percent-encoded and
  cut (`printable`), the status and the time; probes and `/metrics` are not logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Mount, Route

from service import metrics
from service.logging_setup import printable

log = logging.getLogger("befund.http")

Scope = dict[str, Any]
UNMATCHED = "unmatched"
QUIET_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The template of the first route that takes this request (path match, any method)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            if isinstance(route, Mount):
                return f"{route.path}/{{path}}"
            return getattr(route, "path", None)
    return None


def _answered_by(scope: Scope) -> str:
    """After the call: the template of a BentoML route that answered (`/readyz`), else unmatched."""
    route = scope.get("route")
    if isinstance(route, Route):
        return route.path
    if isinstance(route, Mount) and route.path:
        return f"{route.path}/{{path}}"
    return UNMATCHED


class HttpEdge:
    """ASGI middleware; `routes` are befund's own (service/http_api.build_app().routes)."""

    def __init__(self, app: Any, routes: Sequence[BaseRoute], max_target_bytes: int,
                 max_header_bytes: int) -> None:
        self.app = app
        self.routes = tuple(routes)
        self.max_target_bytes = max_target_bytes
        self.max_header_bytes = max_header_bytes

    def refusal(self, scope: Scope) -> tuple[int, str, int] | None:
        """(status, reason, limit) when the request is over a bound; None when it may go on."""
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
        if len(raw_path) + len(scope.get("query_string") or b"") > self.max_target_bytes:
            return 414, "target_too_long", self.max_target_bytes
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
        if header_bytes > self.max_header_bytes:
            return 431, "headers_too_large", self.max_header_bytes
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = route_template(self.routes, scope)
        status = 500  # what the client gets if the app fails before it answers

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is None:
                await self.app(scope, receive, send_noting_status)
            else:
                metrics.HTTP_REFUSED.labels(refused[1]).inc()
                await _refuse(send_noting_status, *refused)
        finally:
            self._record(scope, route or _answered_by(scope), status, time.perf_counter() - start)

    def _record(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        method = scope.get("method", "")
        metrics.HTTP_REQUESTS.labels(route, method if method in METHODS else "OTHER", str(status)).inc()
        metrics.HTTP_SECONDS.labels(route).observe(seconds)
        path = scope.get("path", "")
        if path in QUIET_PATHS:
            return
        client = scope.get("client")
        address = client[0] if client else "-"
        log.info("%s %s %s %d %.1f ms", address, printable(method, 16), printable(path), status,
                 seconds * 1000)


async def _refuse(send: Any, status: int, reason: str, limit: int) -> None:
    what = "request target (path and query)" if status == 414 else "request headers"
    body = json.dumps({"error": f"{what} longer than {limit} bytes", "reason": reason}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
