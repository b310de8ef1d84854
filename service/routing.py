"""Which models take a series: each card's task decides, by the card's selector for the
built-in tasks; no code per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.model_card import ModelCard
from pipelines.tasks import task_of
from service.state.rows import Series

# Series we produce or that carry no pixels for analysis: never routed, never flagged.
RESULT_MODALITIES = frozenset({"SR", "SEG", "KO", "PR", "RTSTRUCT", "DOC"})

PRIORITY = {"high": 10, "normal": 0, "low": -10}


@dataclass(frozen=True)
class Route:
    cards: tuple[ModelCard, ...]
    reason: str  # why no model took the series ('' when some did)
    ignored: bool = False  # result objects and the like: no job and no "not analysed" flag


def series_facts(series: Series) -> dict[str, Any]:
    """The routing view of a series (what model cards' selectors match on)."""
    return {
        "modality": series.modality,
        "sop_class_uid": series.sop_class_uid,
        "body_part": series.body_part,
        "descriptions": series.descriptions,
        "image_type": series.image_type,
        "instance_count": series.instance_count,
    }


def route_series(series: Series, cards: list[ModelCard]) -> Route:
    facts = series_facts(series)
    if facts["modality"].upper() in RESULT_MODALITIES:
        return Route((), f"{facts['modality']} series are results, not images", ignored=True)
    taken, reasons = [], []
    for card in cards:
        why = task_of(card).mismatch(card, facts)
        if why:
            reasons.append(f"{card.name}: {why}")
        else:
            taken.append(card)
    if taken:
        return Route(tuple(taken), "")
    summary = f"{facts['modality'] or 'unknown modality'}"
    if facts["body_part"]:
        summary += f", {facts['body_part']}"
    return Route((), f"no model takes this series ({summary}): " + "; ".join(reasons))


SHADOW_PRIORITY_OFFSET = -100  # below every active job: a shadow run never delays a delivered result


def job_priority(card: ModelCard) -> int:
    """The job's place in the queue (higher first); shadow versions wait for the active ones."""
    priority = PRIORITY.get(card.postprocessing.priority_when_positive, 0)
    return priority + (SHADOW_PRIORITY_OFFSET if card.mode == "shadow" else 0)
