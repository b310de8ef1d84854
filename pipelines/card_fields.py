"""Which keys of a card.yaml no part of befund reads: a typo must not pass silently.

`parse_card` reads the keys it knows and ignores the rest, so `postprocesing:` or `treshold:`
would leave a model running on defaults. The known keys are not listed a second time here:
they are the fields of the typed objects the card was parsed into (ModelCard, TensorSpec,
Selector, the task's preprocessing, ...), so a field added to one of them is known at once.
Free-form blocks (a `dict` field such as `validation` or a fit's record) take any key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.model_card import ModelCard

_NOT_CARD_KEYS = {"folder"}  # ModelCard fields that do not come from card.yaml


def unknown_fields(data: dict[str, Any], card: ModelCard) -> list[str]:
    """Dotted paths of the keys in `data` (the card's YAML) that `card` has no field for,
    e.g. ["postprocessing.treshold"], each with the known keys of its block."""
    return _walk(data, card, "", _NOT_CARD_KEYS)


def _walk(data: Any, parsed: Any, where: str, skip: set[str] = frozenset()) -> list[str]:
    if not isinstance(data, dict) or not dataclasses.is_dataclass(parsed):
        return []
    known = {f.name for f in dataclasses.fields(parsed)} - skip
    out = []
    for key in data:
        path = f"{where}{key}"
        if key not in known:
            out.append(f"{path} (known in {where.rstrip('.') or 'the card'}: {', '.join(sorted(known))})")
            continue
        out.extend(_walk(data[key], getattr(parsed, key), f"{path}."))
    return out
