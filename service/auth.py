"""The token gate in front of the node's HTTP API and worklist page.

An ASGI middleware: a request passes with `Authorization: Bearer <token>` or the cookie
`befund_token` set by the login form. Browsers without either are sent to `/login`; API
clients get 401 JSON. Health, metrics, static assets and the login page stay open.
Tokens are compared in constant time. The middleware serves `/login` and `/logout` itself,
so wiring it needs one line and no extra routes.
"""

from __future__ import annotations

import hmac
import html
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "befund_token"
OPEN_PATHS = ("/healthz", "/readyz", "/livez", "/metrics", "/login", "/static/")
MAX_FORM_BYTES = 8192
COOKIE_MAX_AGE_S = 12 * 3600  # one shift

_LOGIN_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
              "frame-ancestors 'none'; base-uri 'none'")

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>befund - sign in</title>
<style>
 body {{ margin: 0; min-height: 100vh; display: flex; align-items: center; justify-content: center;
        background: #eef1f5; color: #1c2430;
        font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }}
 form {{ background: #fff; padding: 28px 32px; border-radius: 10px; width: 340px;
        box-shadow: 0 2px 12px rgba(20, 30, 50, .12); }}
 h1 {{ font-size: 20px; margin: 0 0 4px; }} h1 span {{ color: #2a5bd7; }}
 p {{ margin: 0 0 18px; color: #5b6675; font-size: 13px; }}
 label {{ display: block; font-weight: 600; margin-bottom: 6px; }}
 input {{ width: 100%; box-sizing: border-box; padding: 9px 10px; border: 1px solid #b9c2cf;
         border-radius: 6px; font: inherit; }}
 button {{ margin-top: 16px; width: 100%; padding: 10px; border: 0; border-radius: 6px;
          background: #2a5bd7; color: #fff; font: inherit; font-weight: 600; cursor: pointer; }}
 .error {{ color: #b3261e; font-weight: 600; margin: 12px 0 0; }}
</style></head>
<body><form method="post" action="/login" id="login">
<h1><span>befund</span> AI worklist</h1>
<p>Enter the access token of this node (in <code>var/token</code> or the node's configuration).</p>
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
{error}
</form></body></html>
"""


def _safe_next(target: str) -> str:
    """Only same-site paths: `/view/1.2.3` yes, `//evil.example` or `https://...` no."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


class TokenAuth:
    """ASGI middleware: `TokenAuth(app, token)`; see the module docstring."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        if not token:
            raise ValueError("TokenAuth needs the node's access token (see var/token)")
        self.app = app
        self._token = token.encode("utf-8")
        self.open_paths = tuple(open_paths)

    # --- decisions -----------------------------------------------------------------------------

    def is_open(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.open_paths)

    def _matches(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode("utf-8"), self._token)

    def is_authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(credential.strip()):
            return True
        return self._matches(_cookie(headers.get("cookie", "")))

    # --- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = _headers(scope)
        if scope["type"] == "http" and path == "/login":
            await self._login(scope, receive, send, headers)
            return
        if scope["type"] == "http" and path == "/logout":
            await _respond(send, 303, b"", {"location": "/login", "set-cookie": _clear_cookie()})
            return
        if self.is_open(path) or self.is_authorised(headers):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if _wants_html(headers):
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            await _respond(send, 303, b"", {"location": "/login?next=" + quote(target, safe="")})
            return
        body = json.dumps({"error": "unauthorised",
                           "detail": "send Authorization: Bearer <token> (the node's token)"}).encode()
        await _respond(send, 401, body, {"content-type": "application/json",
                                         "www-authenticate": 'Bearer realm="befund"'})

    async def _login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        method = scope.get("method", "GET")
        if method in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            await _login_page(send, 200, _safe_next((query.get("next") or ["/"])[0]))
            return
        if method != "POST":
            await _respond(send, 405, b"", {"allow": "GET, POST"})
            return
        form = parse_qs((await _read_body(receive, MAX_FORM_BYTES)).decode("utf-8", "replace"))
        target = _safe_next((form.get("next") or ["/"])[0])
        if not self._matches((form.get("token") or [""])[0].strip()):
            await _login_page(send, 401, target, "That token is not this node's access token.")
            return
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        value = quote(self._token.decode("utf-8"), safe="")
        cookie = f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}{secure}"
        await _respond(send, 303, b"", {"location": target, "set-cookie": cookie})


def _cookie(header: str) -> str | None:
    """The `befund_token` cookie's value; other cookies (however malformed) are ignored."""
    for pair in header.split(";"):
        name, sep, value = pair.strip().partition("=")
        if sep and name == COOKIE:
            return unquote(value.strip().strip('"'))
    return None


def _clear_cookie() -> str:
    return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"


def _wants_html(headers: dict[str, str]) -> bool:
    accept = headers.get("accept", "")
    return "text/html" in accept and headers.get("x-requested-with", "") != "fetch"


async def _read_body(receive: Receive, limit: int) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return b""
        if not message.get("more_body"):
            return body


async def _login_page(send: Send, status: int, target: str, error: str = "") -> None:
    alert = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    page = _LOGIN_PAGE.format(next=html.escape(target, quote=True), error=alert)
    await _respond(send, status, page.encode("utf-8"), {
        "content-type": "text/html; charset=utf-8", "content-security-policy": _LOGIN_CSP,
        "cache-control": "no-store", "x-frame-options": "DENY"})


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
