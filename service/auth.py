"""The token gate in front of the node's HTTP API and worklist page.

An ASGI middleware. A request passes with `Authorization: Bearer <token>` (machines: scripts,
`befund status`; principal `api-token`) or with the session cookie `befund_session` that the
login form sets (people: a named account from service/users.py, user name and password; the
token signs a browser in only while no account exists). The gate puts the principal and the
audit log into the scope (service/web_access.py), where routes check roles and record views.
The cookie holds a random session value (service/sessions.py), never the token; `/logout`
ends the session. Browsers without either are sent to `/login`; API clients get 401 JSON.
Health, metrics, static assets and the login page stay open. The middleware serves `/login`
and `/logout` itself, so wiring it needs one line and no extra routes.

What it defends, each with a log line under `befund.http`:
- guessing: wrong tokens (login form or bearer) are counted per client address; at
  `http_auth_failures_per_minute` the address gets 429 with Retry-After until its oldest
  failure is a minute old (service/login_throttle.py). Tokens are compared in constant time.
- cross-site requests: a state-changing request (POST, PUT, PATCH, DELETE) authenticated by
  the cookie must carry an Origin (or Referer) of this node, or it gets 403; SameSite=Strict
  alone lets a page of another port on the same host through. Bearer clients are scripts: a
  browser cannot attach that header cross-site without a CORS preflight, which nothing allows.
- redirects: `next=` is followed only to a same-site path of printable ASCII, else to `/`.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import anyio

from service import metrics
from service.logging_setup import printable
from service.login_throttle import FailureThrottle
from service.sessions import SessionTable
from service.users import FIRST_START, MACHINE, Principal
from service.web_access import AUDIT_KEY, USER_KEY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("befund.http")

COOKIE = "befund_session"
OPEN_PATHS = ("/healthz", "/readyz", "/livez", "/metrics", "/login", "/static/")
MAX_FORM_BYTES = 8192
SESSION_S = 12 * 3600.0  # one shift
MAX_SESSIONS = 1000
FAILURES_PER_MINUTE = 10
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NEXT_RE = re.compile(r"/(?![/\\])[\x21-\x7e]*")  # a path on this site, printable ASCII only

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
 label {{ display: block; font-weight: 600; margin: 10px 0 6px; }}
 input {{ width: 100%; box-sizing: border-box; padding: 9px 10px; border: 1px solid #b9c2cf;
         border-radius: 6px; font: inherit; }}
 button {{ margin-top: 16px; width: 100%; padding: 10px; border: 0; border-radius: 6px;
          background: #2a5bd7; color: #fff; font: inherit; font-weight: 600; cursor: pointer; }}
 .error {{ color: #b3261e; font-weight: 600; margin: 12px 0 0; }}
</style></head>
<body><form method="post" action="/login" id="login">
<h1><span>befund</span> AI worklist</h1>
<p>{hint}</p>
<label for="user">User name</label>
<input id="user" name="user" autocomplete="username" autocapitalize="none" {user_attrs}>
<label for="token">Password</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
{error}
</form></body></html>
"""


def _safe_next(target: str) -> str:
    """Only same-site paths of printable ASCII: `/view/1.2.3` yes; `//evil.example`,
    `https://...`, a backslash, CR/LF or non-ASCII (which no header may carry) give `/`."""
    if not _NEXT_RE.fullmatch(target or "") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or {"http": 80, "https": 443}.get(scheme)


def same_origin(headers: dict[str, str]) -> bool | None:
    """Does the request's Origin (else Referer) name this node, as the browser reached it (the
    Host header)? None when the request carries neither (not a browser, or a very old one)."""
    source = headers.get("origin") or headers.get("referer")
    if not source:
        return None
    parts = urlsplit(source) if source != "null" else None
    if parts is None or parts.scheme not in ("http", "https"):
        return False
    origin = _host_port(parts.netloc, parts.scheme)
    return origin is not None and origin == _host_port(headers.get("host", ""), parts.scheme)


_HINT_ACCOUNTS = "Sign in with your user name and password."
_HINT_FIRST_START = ("This node has no accounts yet: sign in with its access token as the password "
                     "(in <code>var/token</code> or the node's configuration), and add accounts with "
                     "<code>befund user add</code>.")


class TokenAuth:
    """ASGI middleware: `TokenAuth(app, token, accounts=UserStore(db), audit=AuditLog(db))`;
    see the module docstring. Without `accounts`, the token signs browsers in (as an admin)."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Iterable[str] = OPEN_PATHS, *,
                 failures_per_minute: int = FAILURES_PER_MINUTE, session_s: float = SESSION_S,
                 max_sessions: int = MAX_SESSIONS, secure_cookie: bool = False,
                 clock: Callable[[], float] = time.monotonic, accounts: Any = None,
                 audit: Any = None) -> None:
        if not token:
            raise ValueError("TokenAuth needs the node's access token (see var/token)")
        self.app = app
        self._token = token.encode("utf-8")
        self.open_paths = tuple(open_paths)
        self.sessions = SessionTable(session_s, max_sessions, clock)
        self.throttle = FailureThrottle(failures_per_minute, 60.0, clock=clock)
        self.secure_cookie = secure_cookie
        self.accounts = accounts
        self.audit = audit

    # --- decisions -----------------------------------------------------------------------------

    def is_open(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.open_paths)

    def _has_accounts(self) -> bool:
        return self.accounts is not None and self.accounts.any()

    def _session_user(self, headers: dict[str, str]) -> Principal | None:
        """The signed-in principal, while its account is still enabled with the same role."""
        who = self.sessions.who(_cookie(headers.get("cookie", "")))
        if who is None or (self.accounts is not None and not self.accounts.active(who)):
            return None
        return who

    def _pass(self, scope: Scope, who: Principal) -> Scope:
        scope[USER_KEY] = who
        scope[AUDIT_KEY] = self.audit
        return scope

    def _audit(self, scope: Scope, who: Principal | None, action: str, detail: str = "") -> None:
        if self.audit is not None:
            self.audit.record(who.name if who else "-", who.role if who else "-", action,
                              address=_client(scope), detail=detail)

    def _matches(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(
            candidate.encode("utf-8", "surrogatepass"), self._token)

    def _failed(self, scope: Scope, how: str) -> None:
        """A wrong token: count it against the client's address, say so in the log."""
        address = _client(scope)
        count = self.throttle.failed(address)
        metrics.HTTP_REFUSED.labels("wrong_token").inc()
        if count >= self.throttle.limit:
            log.warning("http: %d wrong tokens from %s within %.0f s (last by %s); its tokens and "
                        "logins are refused with 429 for %d s", count, address,
                        self.throttle.window_s, how, self.throttle.retry_after(address))
        else:
            log.warning("http: wrong token from %s by %s (%d of %d allowed per minute)",
                        address, how, count, self.throttle.limit)

    async def _throttled(self, scope: Scope, send: Send, page: bool) -> bool:
        """Answer 429 (and return True) while the client's address is over its failure limit."""
        wait = self.throttle.retry_after(_client(scope))
        if not wait:
            return False
        metrics.HTTP_REFUSED.labels("throttled").inc()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return True
        message = f"Too many wrong tokens from this address; try again in {wait} s."
        if page:
            await _login_page(send, 429, "/", message, {"retry-after": str(wait)},
                              accounts=self._has_accounts())
        else:
            body = json.dumps({"error": "too many wrong tokens from this address",
                               "retry_after_s": wait}).encode()
            await _respond(send, 429, body, {"content-type": "application/json",
                                             "retry-after": str(wait), "cache-control": "no-store"})
        return True

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
            await self._logout(scope, send, headers)
            return
        if self.is_open(path):
            await self.app(scope, receive, send)
            return
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            if await self._throttled(scope, send, page=False):
                return
            if self._matches(credential.strip()):  # a script: no cookie, no cross-site risk
                await self.app(self._pass(scope, MACHINE), receive, send)
                return
            self._failed(scope, "bearer token")
        elif (who := self._session_user(headers)) is not None:
            if scope.get("method", "GET") in SAFE_METHODS or await self._same_origin(scope, send, headers):
                await self.app(self._pass(scope, who), receive, send)
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
        await _respond(send, 401, body, {"content-type": "application/json", "cache-control": "no-store",
                                         "www-authenticate": 'Bearer realm="befund"'})

    async def _same_origin(self, scope: Scope, send: Send, headers: dict[str, str]) -> bool:
        """A cookie-borne state change must come from this node's own pages; else 403."""
        if same_origin(headers):
            return True
        metrics.HTTP_REFUSED.labels("cross_origin").inc()
        source = headers.get("origin") or headers.get("referer") or "none"
        log.warning("http: refused %s %s from %s: Origin/Referer %s is not this node's",
                    scope.get("method"), printable(scope.get("path", ""), 80), _client(scope),
                    printable(source, 80))
        body = json.dumps({"error": "cross-origin request refused",
                           "detail": "a signed-in browser may change state only from this node's "
                                     "own pages (Origin); scripts send Authorization: Bearer"}).encode()
        await _respond(send, 403, body, {"content-type": "application/json", "cache-control": "no-store"})
        return False

    async def _login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        method = scope.get("method", "GET")
        if method in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            await _login_page(send, 200, _safe_next((query.get("next") or ["/"])[0]),
                              accounts=self._has_accounts())
            return
        if method != "POST":
            await _respond(send, 405, b"", {"allow": "GET, POST"})
            return
        if same_origin(headers) is False:  # a browser on another site; none at all: curl, tests
            await self._same_origin(scope, send, headers)
            return
        if await self._throttled(scope, send, page=True):
            return
        form = parse_qs((await _read_body(receive, MAX_FORM_BYTES)).decode("utf-8", "replace"),
                        max_num_fields=8)
        target = _safe_next((form.get("next") or ["/"])[0])
        who, error = await self._sign_in((form.get("user") or [""])[0].strip(),
                                         (form.get("token") or [""])[0])
        if who is None:
            self._failed(scope, "login form")
            self._audit(scope, None, "sign_in_refused")
            await _login_page(send, 401, target, error, accounts=self._has_accounts())
            return
        session = self.sessions.create(who)
        self._audit(scope, who, "sign_in")
        log.info("http: login of %s (%s) from %s; %d session(s) open", who.name, who.role,
                 _client(scope), len(self.sessions))
        secure = "; Secure" if self.secure_cookie or scope.get("scheme") == "https" else ""
        cookie = (f"{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; "
                  f"Max-Age={int(self.sessions.lifetime_s)}{secure}")
        await _respond(send, 303, b"", {"location": target, "set-cookie": cookie,
                                        "cache-control": "no-store"})

    async def _sign_in(self, name: str, secret: str) -> tuple[Principal | None, str]:
        """(principal, "") for a right name and password, or the token while no account
        exists; (None, what to tell the person) otherwise."""
        if self._has_accounts():
            if not name:
                return None, "This node has accounts: enter your user name and password."
            who = await anyio.to_thread.run_sync(self.accounts.verify, name, secret)
            return (who, "") if who else (None, "Wrong user name or password.")
        if self._matches(secret.strip()):
            return FIRST_START, ""
        return None, "That token is not this node's access token."

    async def _logout(self, scope: Scope, send: Send, headers: dict[str, str]) -> None:
        """GET (the page's link) or POST: end the session and clear the cookie. A cross-site
        GET carries no SameSite=Strict cookie, so only the node's own pages can sign out."""
        if scope.get("method") not in SAFE_METHODS and not await self._same_origin(scope, send, headers):
            return
        value = _cookie(headers.get("cookie", ""))
        who = self.sessions.who(value)
        if self.sessions.end(value):
            self._audit(scope, who, "sign_out")
            log.info("http: logout from %s", _client(scope))
        await _respond(send, 303, b"", {"location": "/login", "set-cookie": _clear_cookie(),
                                        "cache-control": "no-store"})


def _cookie(header: str) -> str | None:
    """The session cookie's value; other cookies (however malformed) are ignored."""
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


async def _login_page(send: Send, status: int, target: str, error: str = "",
                      extra: dict[str, str] | None = None, accounts: bool = False) -> None:
    alert = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    page = _LOGIN_PAGE.format(next=html.escape(target, quote=True), error=alert,
                              hint=_HINT_ACCOUNTS if accounts else _HINT_FIRST_START,
                              user_attrs="required autofocus" if accounts else "")
    await _respond(send, status, page.encode("utf-8"), {
        "content-type": "text/html; charset=utf-8", "content-security-policy": _LOGIN_CSP,
        "cache-control": "no-store", "x-frame-options": "DENY", **(extra or {})})


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
