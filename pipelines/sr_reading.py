"""Read an AI result SR (ours, or one a peer returned) back into plain, JSON-friendly values.

The reader walks the Content Sequence itself (no highdicom parsing), so it also copes with
SRs that follow TID 1500 loosely: the verdict may be a "Finding = Present/Absent" evaluation
(ours) or an evaluation named after the finding itself; certainty may be in % (0..100, ours)
or in UCUM "1" (0..1); algorithm identification may sit in the group or under a measurement.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom

from pipelines import dicom_codes as dc

_VERDICTS = {
    ("52101004", "SCT"): True,    # Present
    ("373066001", "SCT"): True,   # Yes
    ("272519000", "SCT"): False,  # Absent
    ("373067005", "SCT"): False,  # No
    ("82334004", "SCT"): None,    # Indeterminate
    ("373068000", "SCT"): None,   # Undetermined
    ("261665006", "SCT"): None,   # Unknown
}
_NOT_ANALYSED_PREFIX = "not analysed"


def _key(code: pydicom.Dataset | None) -> tuple[str, str]:
    if code is None:
        return ("", "")
    return (str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""),
            str(code.get("CodingSchemeDesignator", "")))


def _code(code: pydicom.Dataset | None) -> dict[str, str] | None:
    if code is None:
        return None
    value, scheme = _key(code)
    return {"value": value, "scheme": scheme, "meaning": str(code.get("CodeMeaning", ""))}


def _is(code: pydicom.Dataset | None, const: Any) -> bool:
    return _key(code) == (const.value, const.scheme_designator)


def _name(item: pydicom.Dataset) -> pydicom.Dataset | None:
    seq = item.get("ConceptNameCodeSequence")
    return seq[0] if seq else None


def _value_code(item: pydicom.Dataset) -> pydicom.Dataset | None:
    seq = item.get("ConceptCodeSequence")
    return seq[0] if seq else None


def _children(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(item.get("ContentSequence") or [])


def _walk(item: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every descendant of `item`, depth first, in document order."""
    for child in _children(item):
        yield child
        yield from _walk(child)


def _num(item: pydicom.Dataset) -> tuple[float | None, pydicom.Dataset | None]:
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return None, None
    mv = seq[0]
    try:
        value = float(mv.NumericValue)
    except (AttributeError, TypeError, ValueError):
        value = None
    units = mv.get("MeasurementUnitsCodeSequence")
    return value, (units[0] if units else None)


def _certainty(value: float | None, unit: pydicom.Dataset | None) -> float | None:
    """Certainty as 0..1: ours is in % (0..100); UCUM "1" is already a fraction."""
    if value is None:
        return None
    if _key(unit) == ("1", "UCUM") and value <= 1.0:
        return value
    return value / 100.0


def _reference(item: pydicom.Dataset) -> dict[str, Any] | None:
    seq = item.get("ReferencedSOPSequence")
    if not seq:
        return None
    ref = seq[0]
    frames_value = ref.get("ReferencedFrameNumber")
    if frames_value is None or frames_value == "":
        frames: list[int] = []
    elif isinstance(frames_value, (list, pydicom.multival.MultiValue)):
        frames = [int(f) for f in frames_value]
    else:
        frames = [int(frames_value)]
    return {"sop_class_uid": str(ref.get("ReferencedSOPClassUID", "")),
            "sop_instance_uid": str(ref.get("ReferencedSOPInstanceUID", "")),
            "frames": frames}


def _reason(text: str) -> str | None:
    """'not analysed: <reason>' -> '<reason>' (also inside a longer summary line)."""
    at = text.lower().find(_NOT_ANALYSED_PREFIX)
    if at < 0:
        return None
    return text[at + len(_NOT_ANALYSED_PREFIX):].lstrip(" :-").strip() or text.strip()


def _read_group(group: pydicom.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finding": None, "finding_site": None, "present": None, "verdict": None, "certainty": None,
        "algorithm": {"name": None, "version": None, "parameters": []},
        "references": [], "not_analysed_reason": None, "measurements": [], "tracking_uid": None,
    }
    verdict_code = None
    named_evaluations = []  # (name, value): evaluations named after the finding (peer style)
    for item in _children(group):
        vt = item.get("ValueType")
        name = _name(item)
        if vt == "CODE":
            value = _value_code(item)
            if _is(name, dc.FINDING):
                if _key(value) in _VERDICTS:
                    verdict_code = value
                elif out["finding"] is None:
                    out["finding"] = _code(value)
            elif _is(name, dc.FINDING_SITE):
                out["finding_site"] = _code(value)
            elif _key(value) in _VERDICTS:
                named_evaluations.append((name, value))
        elif vt == "TEXT" and _is(name, dc.COMMENT):
            reason = _reason(str(item.get("TextValue", "")))
            if reason:
                out["not_analysed_reason"] = reason
        elif vt == "UIDREF" and _is(name, dc.TRACKING_UID):
            out["tracking_uid"] = str(item.get("UID", ""))
    if verdict_code is None and named_evaluations:
        name, verdict_code = named_evaluations[0]
        if out["finding"] is None:
            out["finding"] = _code(name)
    if verdict_code is not None:
        out["present"] = _VERDICTS[_key(verdict_code)]
        out["verdict"] = str(verdict_code.get("CodeMeaning", "")).lower() or None

    seen_refs: dict[str, dict[str, Any]] = {}
    for item in _walk(group):
        vt = item.get("ValueType")
        name = _name(item)
        if vt == "TEXT":
            text = str(item.get("TextValue", ""))
            if _is(name, dc.ALGORITHM_NAME) and out["algorithm"]["name"] is None:
                out["algorithm"]["name"] = text
            elif _is(name, dc.ALGORITHM_VERSION) and out["algorithm"]["version"] is None:
                out["algorithm"]["version"] = text
            elif _is(name, dc.ALGORITHM_PARAMETERS):
                if text not in out["algorithm"]["parameters"]:
                    out["algorithm"]["parameters"].append(text)
        elif vt == "NUM":
            value, unit = _num(item)
            if _is(name, dc.CERTAINTY_OF_FINDING):
                if out["certainty"] is None:
                    out["certainty"] = _certainty(value, unit)
            elif value is not None:
                code = _code(name) or {}
                out["measurements"].append({
                    "name": code.get("meaning", ""), "code": code, "value": value,
                    "unit": _key(unit)[0], "unit_meaning": str(unit.get("CodeMeaning", "")) if unit else "",
                })
        elif vt == "IMAGE":
            ref = _reference(item)
            if ref and ref["sop_instance_uid"]:
                known = seen_refs.get(ref["sop_instance_uid"])
                if known is None:
                    seen_refs[ref["sop_instance_uid"]] = ref
                    out["references"].append(ref)
                else:
                    known["frames"].extend(f for f in ref["frames"] if f not in known["frames"])
    return out


def read_result_sr(ds: pydicom.Dataset) -> dict[str, Any]:
    """Parse an AI result SR into the finding, verdict, certainty, algorithm and references.

    Keys: finding and finding_site ({value, scheme, meaning} or None); present (True, False,
    or None when not analysed or indeterminate); verdict ("present", "absent", "indeterminate");
    certainty (0..1 or None); algorithm {name, version, parameters}; references [{sop_class_uid,
    sop_instance_uid, frames}] and referenced_sop_instance_uids; not_analysed_reason (str or
    None); measurements [{name, code, value, unit, unit_meaning}]; summary (the study-level
    comment); findings (one such dict per measurement group); and the SR's own identifiers.
    """
    if "ContentSequence" not in ds:
        uid = ds.get("SOPInstanceUID", "?")
        raise ValueError(f"instance {uid} is not an SR document (no ContentSequence)")
    title = ds.get("ConceptNameCodeSequence")
    groups: list[pydicom.Dataset] = []
    summary_lines: list[str] = []
    study_evaluations: list[tuple[pydicom.Dataset | None, pydicom.Dataset | None]] = []
    library: list[dict[str, Any]] = []
    for item in _children(ds):
        name = _name(item)
        if item.get("ValueType") != "CONTAINER":
            continue
        if _is(name, dc.IMAGING_MEASUREMENTS):
            groups.extend(g for g in _children(item)
                          if g.get("ValueType") == "CONTAINER" and _is(_name(g), dc.MEASUREMENT_GROUP))
        elif _is(name, dc.QUALITATIVE_EVALUATIONS):
            for child in _children(item):
                if child.get("ValueType") == "TEXT":
                    summary_lines.append(str(child.get("TextValue", "")))
                elif child.get("ValueType") == "CODE":
                    study_evaluations.append((_name(child), _value_code(child)))
        elif _is(name, dc.IMAGE_LIBRARY):
            library.extend(r for it in _walk(item) if it.get("ValueType") == "IMAGE"
                           and (r := _reference(it)) is not None)

    findings = [_read_group(g) for g in groups]
    summary = " ".join(line for line in summary_lines if line).strip() or None
    if findings:
        first = dict(findings[0])
    else:
        first = _read_group(pydicom.Dataset())
        for name, value in study_evaluations:
            if _key(value) in _VERDICTS:
                first["finding"] = _code(name)
                first["present"] = _VERDICTS[_key(value)]
                first["verdict"] = str(value.get("CodeMeaning", "")).lower() or None
                break
    if first["not_analysed_reason"] is None and summary:
        first["not_analysed_reason"] = _reason(summary)

    first.update({
        "analysed": first["not_analysed_reason"] is None and first["present"] is not None,
        "referenced_sop_instance_uids": [r["sop_instance_uid"] for r in first["references"]],
        "summary": summary,
        "findings": findings,
        "image_library": library,
        "title": _code(title[0]) if title else None,
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "preliminary_flag": str(ds.get("PreliminaryFlag", "")) or None,
        "verification_flag": str(ds.get("VerificationFlag", "")) or None,
        "completion_flag": str(ds.get("CompletionFlag", "")) or None,
    })
    return first
