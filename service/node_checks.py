"""What the node's readiness and liveness probes ask, part by part, and why a part fails.

BentoML's own `/readyz` and `/livez` only tell that the Python process answers. A node whose
DICOM listener stopped, whose spool disk is below its watermark (every C-STORE is refused),
whose state DB cannot be read, that loaded no model, or whose job runner died would still
answer 200, and the PACS's studies would go unanalysed in silence. Each check here names one
part, says whether it works and, if not, why, in words an IT team can act on.

Ready: every check holds. Alive: the node's own threads run (a restart helps only there; a
full disk or a refused model card is not fixed by restarting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.node import Node

_GB = 1024**3
STATE_DB_PROBE_S = 2.0  # a probe waits at most this long for the state DB


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    affects_liveness: bool = False


def node_checks(node: Node) -> list[Check]:
    """Every check of what this instance's role runs, in the order of the data flow: receive,
    store, state, analyse, deliver (a receiver has no job runner, a worker no listener)."""
    checks = [_dicom(node)] if node.receives else []
    checks += [_spool(node), _state_db(node)]
    if node.works:
        checks += [_models(node), _thread("completion", node.completion, "series are not completed"),
                   _runner(node), _thread("delivery", node.outbox, "results are not delivered")]
    return checks


def ready(checks: list[Check]) -> bool:
    return all(c.ok for c in checks)


def alive(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.affects_liveness)


def status(checks: list[Check]) -> dict[str, Any]:
    """`GET /status`: ready, alive and each check, JSON-ready."""
    return {"ready": ready(checks), "alive": alive(checks), "checks": [asdict(c) for c in checks]}


def failing(checks: list[Check]) -> str:
    """One line naming what fails, for the log."""
    return "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok)


def _dicom(node: Node) -> Check:
    if not node.listener.serving():
        return Check("dicom", False, "the DICOM listener does not accept associations", True)
    pool = node.receivers
    if pool.running() < pool.size:  # not a liveness failure: the pool starts it again
        return Check("dicom", False, f"{pool.size - pool.running()} of {pool.size + 1} receiver "
                                     "processes are not running (restarting)")
    return Check("dicom", True, f"accepting associations on port {node.listener.port} "
                                f"({pool.size + 1} process(es))", True)


def _spool(node: Node) -> Check:
    try:
        free = node.spool.free_bytes()
    except OSError as e:
        return Check("spool", False, f"the spool cannot be read: {e.strerror or e}")
    watermark = node.spool.min_free_bytes
    text = f"{free / _GB:.1f} GB free, watermark {watermark / _GB:.1f} GB"
    if free < watermark:
        return Check("spool", False, f"{text}: new instances are refused (out of resources)")
    return Check("spool", True, text)


def _state_db(node: Node) -> Check:
    try:
        node.db.ping(STATE_DB_PROBE_S)
    except Exception as e:  # noqa: BLE001 - sqlite3, psycopg and pool errors alike: not ready
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        return Check("state_db", False, f"the state DB ({node.db.describe()}) cannot be read: "
                                        f"{detail}; new instances are refused (out of resources)")
    return Check("state_db", True, f"{node.db.describe()} answers")


def _models(node: Node) -> Check:
    refused = "".join(f"; {folder} refused: {error}" for folder, error in node.card_errors.items())
    if not node.cards:
        return Check("models", False, "no model is loaded, so nothing can be analysed" + refused)
    return Check("models", True, ", ".join(c.key + (" (shadow)" if c.mode == "shadow" else "")
                                           for c in node.cards) + refused)


def _runner(node: Node) -> Check:
    if node.runner is None:
        return Check("jobs", False, "the job runner has not started (waiting for the model service)")
    if not node.runner.alive():
        return Check("jobs", False, "the job runner stopped: series are not analysed", True)
    return Check("jobs", True, "running", True)


def _thread(name: str, part: Any, consequence: str) -> Check:
    if part.alive():
        return Check(name, True, "running", True)
    return Check(name, False, f"stopped: {consequence}", True)
