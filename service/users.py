"""Named accounts with roles, kept in the state DB; passwords hashed with Argon2id.

Who may do what is one table (`PERMISSIONS`), read by the HTTP API and the worklist:

- `radiologist`: read the worklist and acknowledge or dismiss a flag.
- `admin`: read, resend and discard deliveries, run a study, view the config and the audit log.
- `ml`: the model reports (`GET /models`), the node's status, and the shadow view: shadow
  models' results beside the active ones', by UID (`GET /shadow/studies`, the shadow report);
  no patients' studies (no names, IDs or accession numbers).

The node's API token stays for machines (`befund status`, scripts, a RIS): a Bearer request
acts as the principal `api-token` with every permission. A browser signs in with a name and
password; the token opens the browser only while no account exists (first start, before
`befund user add`), so that a node is never locked out and never shared once it has users.

Passwords are hashed with argon2-cffi (Argon2id, its RFC 9106 low-memory profile); a
sign-in with an unknown name still verifies against a dummy hash, so the answer time does
not tell which names exist.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

from service.state_db import StateDB

ROLES = ("radiologist", "admin", "ml")
PERMISSIONS: dict[str, frozenset[str]] = {
    "radiologist": frozenset({"read", "acknowledge"}),
    "admin": frozenset({"read", "resend", "discard", "run", "config", "audit"}),
    "ml": frozenset({"models", "status", "shadow"}),
    "machine": frozenset({"read", "acknowledge", "resend", "discard", "run", "config", "audit",
                          "models", "status", "shadow"}),
}
# Everyone signed in may read the node's status and the loaded models' cards.
COMMON = frozenset({"status", "models"})
NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{1,31}$")  # shown in the audit log as it is
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 256  # Argon2 takes any length; a bound keeps a login form cheap

_HASHER = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
_DUMMY_HASH = _HASHER.hash("befund: no such user")


class UserError(ValueError):
    """An account that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who makes a request: an account (name, role) or the machine token."""

    name: str
    role: str

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset()) or permission in COMMON


MACHINE = Principal("api-token", "machine")
# Before any account exists the token signs a browser in as this principal (an admin).
FIRST_START = Principal("token", "admin")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise UserError(f"user name {name!r} must be 2-32 characters: a lowercase letter, then "
                        "lowercase letters, digits, '.', '_' or '-'")
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise UserError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters, "
                        f"not {len(password)}")
    return password


class UserStore:
    """Accounts in the state DB's `users` table."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    def add(self, name: str, role: str, password: str, replace: bool = False) -> Principal:
        """Create an account (or, with `replace`, set a new role and password for it)."""
        check_name(name)
        if role not in ROLES:
            raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
        hashed = _HASHER.hash(check_password(password))
        with self.db.transaction() as db:
            known = db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone()
            if known and not replace:
                raise UserError(f"user {name} exists already (use --replace to set a new password)")
            db.execute(
                """INSERT INTO users(name, role, password_hash, created_at) VALUES (?,?,?,?)
                   ON CONFLICT(name) DO UPDATE SET role=excluded.role,
                       password_hash=excluded.password_hash, disabled=0""",
                (name, role, hashed, time.time()))
        return Principal(name, role)

    def disable(self, name: str) -> bool:
        with self.db.transaction() as db:
            return db.execute("UPDATE users SET disabled=1 WHERE name=?", (name,)).rowcount == 1

    def any(self) -> bool:
        """True once an account exists (the token then no longer signs browsers in)."""
        return self.db.query_one("SELECT 1 AS x FROM users LIMIT 1") is not None

    def active(self, who: Principal) -> bool:
        """Is a signed-in account still enabled, with the same role? (Checked per request, so
        `befund user disable` or a new role takes effect at once, not when a session ends.)"""
        if who == FIRST_START:
            return not self.any()
        row = self.db.query_one("SELECT role FROM users WHERE name=? AND disabled=0", (who.name,))
        return row is not None and row["role"] == who.role

    def list(self) -> list[dict]:
        return self.db.query("SELECT name, role, created_at, disabled FROM users ORDER BY name")

    def verify(self, name: str, password: str) -> Principal | None:
        """The account if the password is its own; None otherwise (in about the same time)."""
        row = None
        if NAME_RE.fullmatch(name or "") and len(password) <= MAX_PASSWORD_CHARS:
            row = self.db.query_one("SELECT * FROM users WHERE name=? AND disabled=0", (name,))
        try:
            _HASHER.verify(row["password_hash"] if row else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _HASHER.check_needs_rehash(row["password_hash"]):
            with self.db.transaction() as db:
                db.execute("UPDATE users SET password_hash=? WHERE name=?",
                           (_HASHER.hash(password), name))
        return Principal(row["name"], row["role"])
