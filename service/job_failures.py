"""What the job runner needs to know about a failed attempt: its stage, and an error text that
is safe to show (API, worklist, the "not analysed" SR, the log).

A job passes through the stages below in order; the runner records the stage it enters in the
state DB, so an attempt that crashed, or a node that died during one, is reported with the
stage it was in ("not analysed: internal error in SEG encoding after 3 attempts: ...").

Error texts come from exceptions of pydicom, highdicom, numpy and our own code, and some quote
the value they choke on, which can be a patient's birth date or name. `describe_error` keeps
the exception's type and its words, and drops quoted values (except plain identifiers such as
a DICOM keyword) and the study's known patient identifiers.

`FaultInjection` is a test hook: the config key `fault_injection` ({series UID: stage}) makes
that stage fail for that series, so tests can reach stages that real inputs cannot. The
config refuses the key unless `BEFUND_TESTING=1` is set in the node's environment, so no
peer and no production config can turn it on.
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Iterable, Mapping
from enum import StrEnum

MAX_ERROR_CHARS = 300
_QUOTED = re.compile(r"'[^'\n]{0,400}'|\"[^\"\n]{0,400}\"")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")  # keywords, class and module names
_NAME_PARTS = re.compile(r"[\^=\s,]+")
_MIN_PART = 3  # shorter name parts ("Mr", "Jr") would blank out ordinary words


class Stage(StrEnum):
    """The stages of one attempt of a job, in order (the value is stored in the state DB)."""

    ANALYSIS = "analysis"
    ENCODE_SR = "encode_sr"
    ENCODE_SEG = "encode_seg"
    SAVE = "save"
    DELIVERIES = "deliveries"
    RESULT_ROW = "result_row"

    @property
    def label(self) -> str:
        """How the stage reads in a reason: "internal error in <label>"."""
        return _LABELS[self]

    @classmethod
    def stored(cls, value: str | None) -> Stage:
        """The stage a state-DB row names (analysis for rows from before stages were kept)."""
        try:
            return cls(value or cls.ANALYSIS)
        except ValueError:
            return cls.ANALYSIS


_LABELS = {
    Stage.ANALYSIS: "analysis",
    Stage.ENCODE_SR: "SR encoding",
    Stage.ENCODE_SEG: "SEG encoding",
    Stage.SAVE: "saving the result files",
    Stage.DELIVERIES: "building the deliveries",
    Stage.RESULT_ROW: "recording the result",
}


def describe_error(exc: BaseException, private: Iterable[str] = ()) -> str:
    """`Type: message` without quoted values or `private` strings, printable, at most 300 chars."""
    text = f"{type(exc).__name__}: {exc}"
    for value in _private_variants(private):
        text = re.sub(re.escape(value), "...", text, flags=re.IGNORECASE)
    text = _QUOTED.sub(_keep_identifier, text)
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _keep_identifier(match: re.Match[str]) -> str:
    quoted = match.group(0)
    return quoted if _IDENTIFIER.fullmatch(quoted[1:-1]) else f"{quoted[0]}...{quoted[-1]}"


def _private_variants(values: Iterable[str]) -> list[str]:
    """Each value and, for names, each part of it, longest first (so parts go after wholes)."""
    out = set()
    for value in values:
        value = (value or "").strip()
        if not value:
            continue
        out.add(value)
        out.update(p for p in _NAME_PARTS.split(value) if len(p) >= _MIN_PART)
    return sorted(out, key=len, reverse=True)


def frames_of(exc: BaseException, limit: int = 8) -> str:
    """Where an exception was raised (files, lines, code), without its message, for the log."""
    return "".join(traceback.format_tb(exc.__traceback__)[-limit:]).rstrip()


class InjectedFault(RuntimeError):
    """Raised by the test hook; never raised unless a test configured it."""


class FaultInjection:
    """The `fault_injection` test hook: fail `stage` for the series the config names; and
    `fault_delays`: every job waits this long before entering the stage (a slow analysis, so
    that tests can kill a node that holds leased jobs)."""

    def __init__(self, faults: Mapping[str, str] | Iterable[tuple[str, str]] = (),
                 delays: Iterable[tuple[str, float]] = ()):
        pairs = faults.items() if isinstance(faults, Mapping) else faults
        self.faults = {series: Stage(stage) for series, stage in pairs}
        self.delays = {Stage(stage): float(seconds) for stage, seconds in delays}

    def check(self, stage: Stage, series_uid: str) -> None:
        if self.delays.get(stage):
            time.sleep(self.delays[stage])  # the test hook's slow stage, never configured otherwise
        if self.faults.get(series_uid) is stage:
            raise InjectedFault(f"fault injected into {stage.label} by the test hook")
