"""Who is asking, may they, and the audit entry for what they did: one place for every route.

The token gate (service/auth.py) puts the request's principal (service/users.py) and the
audit log into the ASGI scope; routes call `denied(request, "resend")` before they act and
`record(request, "view_study", uid)` when they showed or changed something. A request that
reached a route without a principal is refused: fail closed.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.users import Principal

USER_KEY = "befund.user"
AUDIT_KEY = "befund.audit"


def principal(request: Request) -> Principal | None:
    return request.scope.get(USER_KEY)


def denied(request: Request, permission: str) -> JSONResponse | None:
    """A 403 answer when the request's principal lacks `permission`; None when it may go on."""
    who = principal(request)
    if who is not None and who.may(permission):
        return None
    role = who.role if who else "nobody"
    return JSONResponse({"error": "forbidden", "detail": f"the {role} role may not {permission}"},
                        status_code=403, headers={"cache-control": "no-store"})


def record(request: Request, action: str, study_uid: str | None = None, detail: str = "") -> None:
    """Write the audit entry for this request (who, from where, now)."""
    log: Any = request.scope.get(AUDIT_KEY)
    who = principal(request)
    if log is None or who is None:
        return
    client = request.scope.get("client")
    log.record(who.name, who.role, action, study_uid, str(client[0]) if client else "", detail)
