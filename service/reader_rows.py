"""Study rows in the words a radiologist reads: what the worklist and `GET /studies` add to
service/study_status.py's rows, without changing them.

- `verdict_text`: "Intracranial hemorrhage" for a positive, "No intracranial hemorrhage
  detected" for a negative (with its certainty beside it, not "Absent 100 %"), "Not analysed".
- `reason_text`: a "not analysed" or "delivery failed" reason that starts with the reason in
  plain words; UIDs, file paths and exception names stay in `reason`, for the detail view.
- `review`: who acknowledged or dismissed the flag of this result, and when
  (service/flag_reviews.py); `result_at`: when the shown result was made; `viewer_url`: the
  study in the PACS viewer (service/viewer_links.py).
"""

from __future__ import annotations

import re
from typing import Any

from service.state_db import StateDB
from service.viewer_links import viewer_url

_UID = r"\d+(?:\.\d+){2,}"
_SUBJECT_UID = re.compile(rf"\b(series|slide|study|instance)\s+{_UID}", re.IGNORECASE)
_LEADING_NOT_ANALYSED = re.compile(r"^(the )?(series|slide|study)\s*(not analysed)?\s*:\s*", re.IGNORECASE)
_PATH = re.compile(r"(?:(?<=\s)|^)/[^\s:]+(?::\s*)?")
_BARE_UID = re.compile(rf"\s*\(?\b{_UID}\b\)?")
_EXCEPTION = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b:?\s*")
_NO_MODEL = re.compile(r"^no model takes this series(?: \(([^)]*)\))?", re.IGNORECASE)
_FAILED_AFTER = re.compile(r"^analysis failed after (\d+) attempts?", re.IGNORECASE)
_DELIVERY = re.compile(r"^(dicom|hl7|webhook) to (\S+?):", re.IGNORECASE)
_SENT_TO = {"dicom": "to the PACS", "hl7": "to the RIS (HL7)", "webhook": "to a webhook"}
MAX_CHARS = 140


def reason_text(reason: str) -> str:
    """The reason in plain words, first; identifiers left to the detail view."""
    text = " ".join((reason or "").split())
    if not text:
        return ""
    if m := _NO_MODEL.match(text):
        facts = f" ({m.group(1)})" if m.group(1) else ""
        return f"No model here analyses this kind of series{facts}."
    if m := _FAILED_AFTER.match(text):
        return f"The analysis failed {m.group(1)} times; the detail view says why."
    if m := _DELIVERY.match(text):
        kind = _SENT_TO[m.group(1).lower()]
        return f"The result could not be sent {kind} ({m.group(2)}); the detail view says why."
    text = _SUBJECT_UID.sub(lambda m: f"the {m.group(1).lower()}", text)
    text = _LEADING_NOT_ANALYSED.sub("", text)
    text = _PATH.sub("", text)
    text = _BARE_UID.sub("", text)
    text = _EXCEPTION.sub("", text).strip(" :;,")
    if not text:
        return "Not analysed; the detail view says why."
    text = text[0].upper() + text[1:]
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1].rstrip() + "\u2026"


def verdict_text(row: dict[str, Any], meaning: str | None) -> str:
    finding = meaning or "the finding"
    if row.get("state") == "not analysed" and row.get("present") is None:
        return "Not analysed"
    if row.get("present") is True:
        return finding[0].upper() + finding[1:]
    if row.get("present") is False:
        return f"No {finding[0].lower() + finding[1:]} detected"
    return ""


def finding_meanings(cards: list[Any]) -> dict[tuple[str, str], str]:
    return {(c.name, c.version): c.finding.code.meaning for c in cards}


def result_times(db: StateDB) -> dict[tuple, float]:
    """When each (study, model, version, run) got its result (the latest of its series)."""
    rows = db.query(
        """SELECT study_uid, model_name, model_version, run, MAX(finished_at) AS t FROM jobs
           WHERE finished_at IS NOT NULL GROUP BY study_uid, model_name, model_version, run""")
    return {(r["study_uid"], r["model_name"], r["model_version"], r["run"]): r["t"] for r in rows}


def reader_rows(rows: list[dict[str, Any]], db: StateDB, cards: list[Any], viewer_template: str,
                reviews: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the reader's fields added (in place; also returned)."""
    meanings = finding_meanings(cards)
    times = result_times(db)
    for row in rows:
        key = (row.get("model"), row.get("model_version"))
        row["finding_meaning"] = meanings.get(key)
        row["verdict_text"] = verdict_text(row, meanings.get(key))
        row["reason_text"] = reason_text(row.get("reason") or "")
        row["result_at"] = times.get((row["study_uid"], *key, row.get("run")))
        row["viewer_url"] = viewer_url(viewer_template, row)
        review = reviews.get(row["study_uid"])
        current = review is not None and (review["model"], review["model_version"], review["run"]) == (
            row.get("model"), row.get("model_version"), row.get("run"))
        row["review"] = ({"action": review["action"], "user": review["user"], "at": review["at"]}
                         if current else None)
    return rows
