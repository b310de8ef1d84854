"""Which model cards run: a model's way from shadow to active to retired.

A card's `mode` says what the node does with it:

- `active`: routed, run and delivered (PACS, HL7, webhooks, the radiologists' worklist).
- `shadow`: routed and run on the same series as the active version; its results are kept
  (state DB, API, the `ml` role's shadow view, the shadow report) and never delivered or shown
  to readers as a flag.
- `disabled`: loaded nowhere (its ONNX file is not even read) and routed nowhere.

At most one version of a model name is active. Two active versions are refused at start,
naming both folders and versions, unless one of them says `supersedes: <the other's version>`:
the superseded version is then retired (not run at all, as if disabled). To keep comparing
the old version after the switch, set its `mode: shadow` instead. A shadow card may name the
version it will replace ahead of time (`supersedes` acts only between active cards), so going
live is one line: `mode: shadow` -> `mode: active`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.model_card import CardError, ModelCard, load_card


class LineupError(CardError):
    """The cards under the models folder cannot run together (two active versions of a model)."""


@dataclass(frozen=True)
class Lineup:
    """What runs (`cards`: active and shadow), what was refused and why (`errors`, by folder
    name), and what is deliberately not run (`retired`: disabled or superseded, by folder name)."""

    cards: tuple[ModelCard, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)
    retired: dict[str, str] = field(default_factory=dict)
    parsed: tuple[ModelCard, ...] = ()  # every card that parsed, whether it runs or not

    def known_keys(self) -> set[str]:
        """Every parsed card's name and name@version (what a config may refer to)."""
        return {k for c in self.parsed for k in (c.name, c.key)}

    def active(self, name: str) -> ModelCard | None:
        """The active version of model `name`, if one runs."""
        return next((c for c in self.cards if c.name == name and c.mode == "active"), None)

    def shadows(self, name: str) -> list[ModelCard]:
        return [c for c in self.cards if c.name == name and c.mode == "shadow"]


def model_lineup(models_dir: str | Path) -> Lineup:
    """Load every card under `models_dir` and decide what runs.

    A broken card (a typo, an ONNX file still being trained) is refused alone: the others still
    run. Two active versions of one model are not a broken card but a contradiction the
    operator must resolve: LineupError, and the node does not start.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return Lineup((), {str(root): "models folder does not exist"}, {})
    cards: list[ModelCard] = []
    parsed: list[ModelCard] = []
    errors: dict[str, str] = {}
    retired: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "card.yaml").is_file()):
        try:
            card = load_card(folder, verify=False)
            parsed.append(card)
            if card.mode == "disabled":
                retired[folder.name] = f"{card.key} is disabled (mode: disabled in its card)"
                continue
            card.verify_file()
        except CardError as exc:
            errors[folder.name] = str(exc)
            continue
        if any(c.key == card.key for c in cards):
            errors[folder.name] = f"{card.key} is already served by another folder"
            continue
        cards.append(card)
    running, superseded = resolve_actives(cards)
    return Lineup(tuple(running), errors, {**retired, **superseded}, tuple(parsed))


def resolve_actives(cards: list[ModelCard]) -> tuple[list[ModelCard], dict[str, str]]:
    """Drop active cards that another active card supersedes; refuse two active versions that
    remain. Returns the cards that run and, by folder name, why each dropped one does not."""
    actives: dict[str, list[ModelCard]] = {}
    for card in cards:
        if card.mode == "active":
            actives.setdefault(card.name, []).append(card)
    dropped: dict[str, str] = {}
    for name, versions in actives.items():
        if len(versions) < 2:
            continue
        by_version = {c.version: c for c in versions}
        replaced = {c.supersedes: c for c in versions if c.supersedes in by_version}
        left = [c for c in versions if c.version not in replaced]
        if len(left) != 1:
            raise LineupError(_two_actives(name, left or versions))
        for version, newer in replaced.items():
            old = by_version[version]
            dropped[old.folder.name] = (f"{old.key} is superseded by {newer.key} ({newer.folder}: "
                                        f"supersedes: {version}); not run")
    return [c for c in cards if c.folder.name not in dropped], dropped


def _two_actives(name: str, cards: list[ModelCard]) -> str:
    ordered = sorted(cards, key=lambda c: _version_order(c.version))
    listed = " and ".join(f"{c.key} ({c.folder})" for c in ordered)
    older, newer = ordered[0], ordered[-1]
    return (f"{len(cards)} active versions of model {name}: {listed}. Only one version of a "
            f"model may be active: set `mode: shadow` in {newer.folder}/card.yaml to compare it "
            f"first, or `supersedes: \"{older.version}\"` there to replace {older.key}")


def _version_order(version: str) -> tuple:
    """1.10.0 after 1.9.0: numbers compare as numbers, the rest as text."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"[.\-+]", version))
