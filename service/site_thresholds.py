"""Per-site operating points: a model's threshold per sending site; the card's everywhere else.

    site_thresholds:
      ich_ct:                              # every version of ich_ct
        calling_ae: {CT_NORTH: 0.4}        # the AE title that sent the series
        institution: {"Klinikum Sued": 0.6}  # Institution Name (0008,0080) of its images
      ich_ct@0.2.0:                        # this version only; wins over the name's entry
        calling_ae: {CT_NORTH: 0.45}

A series gets its institution's threshold when one is configured, else its calling AE's,
else the card's `postprocessing.threshold`. The institution comes first: a PACS that forwards
for several hospitals is one calling AE, while the institution names the site whose scanners,
protocols and population the operating point was chosen for. Institution names compare
without regard to case or repeated spaces; AE titles exactly (less padding).

Only the verdict moves with the threshold: the score and its calibrated probability stay what
the model and the card say (pipelines/operating_point.py). The threshold used and where it
came from are recorded in the SR (Algorithm Parameters) and in the API's job rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # as service/config.py checks ae_title
MODEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9.+_-]{0,63})?$")
MAX_INSTITUTION_CHARS = 64  # Institution Name is LO: 64 characters
SITE_KINDS = ("calling_ae", "institution")
CARD = "card"


@dataclass(frozen=True)
class SiteThresholds:
    """The thresholds of one model (`ich_ct`) or model version (`ich_ct@0.2.0`) per site."""

    model: str
    calling_ae: tuple[tuple[str, float], ...] = ()
    institution: tuple[tuple[str, float], ...] = ()

    def applies_to(self, name: str, version: str) -> bool:
        return self.model in (name, f"{name}@{version}")


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold a series is judged at, and where it came from ("card", "calling AE
    CT_NORTH", "institution Klinikum Sued")."""

    threshold: float
    source: str = CARD


def parse_site_thresholds(value: Any) -> tuple[SiteThresholds, ...]:
    """The config's `site_thresholds` mapping; ValueError naming the key for anything amiss."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError("site_thresholds must map model names (ich_ct, or ich_ct@0.2.0 for one "
                         "version) to {calling_ae: {AE: threshold}, institution: {name: threshold}}")
    out = []
    for model, sites in value.items():
        where = f"site_thresholds.{model}"
        if not isinstance(model, str) or not MODEL_KEY_RE.match(model):
            raise ValueError(f"{where}: {model!r} is not a model name (or name@version)")
        if not isinstance(sites, dict) or not sites:
            raise ValueError(f"{where}: give calling_ae and/or institution, each a mapping of "
                             "site to threshold")
        unknown = sorted(set(sites) - set(SITE_KINDS))
        if unknown:
            raise ValueError(f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; known: "
                             f"{', '.join(SITE_KINDS)}")
        out.append(SiteThresholds(model, _sites(sites.get("calling_ae"), f"{where}.calling_ae", _ae),
                                  _sites(sites.get("institution"), f"{where}.institution",
                                         _institution)))
    return tuple(out)


def _sites(value: Any, where: str, site_name: Any) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must map each site to a threshold, e.g. {{CT_NORTH: 0.4}}")
    out: dict[str, float] = {}
    for site, threshold in value.items():
        name = site_name(site, where)
        if name in out:
            raise ValueError(f"{where}: {site!r} is named twice")
        out[name] = _threshold(threshold, f"{where}.{site}")
    return tuple(out.items())


def _ae(site: Any, where: str) -> str:
    text = str(site).strip()
    if not AE_TITLE_RE.match(text):
        raise ValueError(f"{where}: {site!r} is not an AE title (1-16 characters, no backslash)")
    return text


def _institution(site: Any, where: str) -> str:
    text = normalise_institution(str(site))
    if not text or len(text) > MAX_INSTITUTION_CHARS:
        raise ValueError(f"{where}: {site!r} is not an institution name (1-64 characters)")
    return text


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a threshold between 0 and 1")
    try:
        threshold = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {value!r} is not a threshold between 0 and 1") from exc
    if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise ValueError(f"{where}: {threshold:g} must lie between 0 and 1 (exclusive), as a card's")
    return threshold


def normalise_institution(name: str) -> str:
    return " ".join(name.split()).casefold()


def operating_point(rules: tuple[SiteThresholds, ...], name: str, version: str,
                    card_threshold: float, calling_ae: str, institution: str) -> OperatingPoint:
    """The threshold for one series of model `name@version` (see the module docstring)."""
    mine = [r for r in rules if r.applies_to(name, version)]
    mine.sort(key=lambda r: r.model != f"{name}@{version}")  # the version's entry first
    wanted = normalise_institution(institution or "")
    if wanted:
        for rule in mine:
            for site, threshold in rule.institution:
                if site == wanted:
                    return OperatingPoint(threshold, f"institution {' '.join(institution.split())}")
    sender = (calling_ae or "").strip()
    if sender:
        for rule in mine:
            for site, threshold in rule.calling_ae:
                if site == sender:
                    return OperatingPoint(threshold, f"calling AE {sender}")
    return OperatingPoint(card_threshold, CARD)


def unknown_models(rules: tuple[SiteThresholds, ...], keys: set[str]) -> list[str]:
    """Entries that name no model card (`keys`: every card's name and name@version)."""
    return [r.model for r in rules if r.model not in keys]


def wants_institution(rules: tuple[SiteThresholds, ...], name: str, version: str) -> bool:
    """True when some entry for this model names institutions (only then is a header read)."""
    return any(r.institution for r in rules if r.applies_to(name, version))


def sending_site(db: Any, series_uid: str, institution: bool) -> tuple[str, str]:
    """(calling AE title, Institution Name) of a series: the AE from the state DB (who sent its
    first instance), the institution from the header of its first instance still spooled."""
    row = db.query_one(
        "SELECT calling_ae FROM instances WHERE series_uid=? ORDER BY received_at LIMIT 1",
        (series_uid,)) or {}
    name = ""
    if institution:
        first = db.query_one(
            """SELECT path FROM instances WHERE series_uid=? AND purged_at IS NULL
               ORDER BY instance_number, sop_instance_uid LIMIT 1""", (series_uid,))
        if first is not None:
            import pydicom

            header = pydicom.dcmread(first["path"], stop_before_pixels=True,
                                     specific_tags=["InstitutionName"])
            name = str(header.get("InstitutionName") or "")[:MAX_INSTITUTION_CHARS]
    return (row.get("calling_ae") or "").strip(), name
