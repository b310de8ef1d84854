"""Where a result goes: destinations per rule, and the one-line account of it for operators.

    destinations:
      - {name: pacs, ae_title: PACS, host: 10.20.1.5, port: 104}
      - {name: stroke, ae_title: STROKE_PACS, host: 10.20.9.7, port: 104}
    delivery_rules:
      - {destination: stroke, finding: present, modality: [CT]}   # positives also to the stroke team

A destination that no rule names receives every result (as before rules existed); one that
rules name receives the results that match at least one of its rules. A rule matches on
`modality` (the analysed series'), `calling_ae` (the AE title that sent the series) and
`finding` (`present`, `absent`, `not_analysed` or `any`); a field left out matches anything.

`summary(config)` says where results are sent (DICOM destinations, HL7, webhooks) and, when
that is nowhere, says so: a node that analyses and keeps the results to itself must not look
like one that delivers them (start-up line, `GET /status`, the worklist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.state.rows import Job

FINDINGS = ("any", "present", "absent", "not_analysed")
NOWHERE = ("results are not sent anywhere: no destination, HL7 receiver or webhook is configured "
           "(set destinations in befund.yaml or BEFUND_PACS=AE@host:port)")


@dataclass(frozen=True)
class DeliveryRule:
    """Send results that match to `destination` (a name from `destinations`)."""

    destination: str
    modality: tuple[str, ...] = ()
    calling_ae: tuple[str, ...] = ()
    finding: str = "any"

    def __post_init__(self) -> None:
        if self.finding not in FINDINGS:
            raise ValueError(f"delivery_rules: finding {self.finding!r} is not one of {', '.join(FINDINGS)}")

    def matches(self, facts: dict[str, Any]) -> bool:
        if self.modality and (facts.get("modality") or "").upper() not in {m.upper() for m in self.modality}:
            return False
        if self.calling_ae and (facts.get("calling_ae") or "").strip() not in self.calling_ae:
            return False
        return self.finding == "any" or self.finding == facts.get("finding")


def parse_rule(value: Any) -> DeliveryRule:
    """A rule from its YAML mapping; lists or a single string for modality and calling_ae."""
    if not isinstance(value, dict):
        raise ValueError(f"delivery_rules: each rule is a mapping, not {value!r}")
    unknown = set(value) - {"destination", "modality", "calling_ae", "finding"}
    if unknown:
        raise ValueError(f"delivery_rules: unknown key(s) {', '.join(sorted(unknown))}; "
                         "known: destination, modality, calling_ae, finding")
    if not value.get("destination"):
        raise ValueError("delivery_rules: each rule needs a destination (a name from destinations)")

    def names(key: str) -> tuple[str, ...]:
        raw = value.get(key) or ()
        return (str(raw),) if isinstance(raw, str) else tuple(str(v) for v in raw)

    return DeliveryRule(str(value["destination"]), names("modality"), names("calling_ae"),
                        str(value.get("finding", "any")))


def check_rules(destinations: tuple, rules: tuple[DeliveryRule, ...]) -> None:
    """Every destination has its own name, and every rule names one of them."""
    names = [d.name for d in destinations]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"destinations need distinct names; {', '.join(doubled)} is used more than once "
                         "(write each as {name: ..., ae_title: ..., host: ..., port: ...})")
    for rule in rules:
        if rule.destination not in names:
            raise ValueError(f"delivery_rules: destination {rule.destination!r} is not among "
                             f"destinations ({', '.join(names) or 'none configured'})")


def destinations_for(destinations: tuple, rules: tuple[DeliveryRule, ...], facts: dict[str, Any]) -> list:
    """The destinations this result goes to (see the module docstring)."""
    ruled = {r.destination for r in rules}
    return [d for d in destinations
            if d.name not in ruled or any(r.matches(facts) for r in rules if r.destination == d.name)]


def job_facts(db: Any, job: Job, analysed: bool, present: bool | None) -> dict[str, Any]:
    """What rules match on, for one job: its series' modality and sender, and its verdict."""
    series = db.query_one("SELECT modality FROM series WHERE series_uid=?", (job.series_uid,)) or {}
    sender = db.query_one(
        "SELECT calling_ae FROM instances WHERE series_uid=? ORDER BY received_at LIMIT 1",
        (job.series_uid,)) or {}
    finding = ("present" if present else "absent") if analysed else "not_analysed"
    return {"modality": series.get("modality") or "", "calling_ae": sender.get("calling_ae") or "",
            "finding": finding}


def summary(config: Any) -> dict[str, Any]:
    """Where results go, as lines an operator reads, and the notice when that is nowhere."""
    ruled = {r.destination for r in config.delivery_rules}
    targets = []
    for d in config.destinations:
        rules = [r for r in config.delivery_rules if r.destination == d.name]
        when = "; ".join(_rule_text(r) for r in rules) if d.name in ruled else "every result"
        targets.append(f"DICOM {d.name} = {d.ae_title}@{d.host}:{d.port} ({when})")
    if config.hl7.host and config.hl7.port:
        targets.append(f"HL7 {config.hl7.host}:{config.hl7.port}")
    targets.extend(f"webhook {url}" for url in config.webhooks)
    return {"targets": targets, "notice": "" if targets else NOWHERE}


def _rule_text(rule: DeliveryRule) -> str:
    parts = [f"finding {rule.finding}"] if rule.finding != "any" else []
    if rule.modality:
        parts.append("modality " + "/".join(rule.modality))
    if rule.calling_ae:
        parts.append("from " + "/".join(rule.calling_ae))
    return ", ".join(parts) or "every result"
