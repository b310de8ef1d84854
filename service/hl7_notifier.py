"""HL7 v2 notifier: an ORU^R01 preliminary result for the RIS worklist engine, sent over MLLP.

The AI supplies the finding (coded, with an abnormal flag and a certainty); the RIS owns the
priority rule. A job that was not analysed is reported as "not analysed" with its reason,
never as silence. The message carries the patient's name and ID because the RIS needs them to
match the order; they are never logged here.

`send_mllp` raises `DeliveryError` on any failure (no connection, timeout, a negative ACK) so
that the outbox retries with backoff.
"""

from __future__ import annotations

import json
import re
import socket
import time
from datetime import datetime
from typing import Any

from service.delivery_errors import DeliveryError

SENDING_APPLICATION = "BEFUND"
HL7_VERSION = "2.5"
SEGMENT_SEP = "\r"
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20

# Our own code table (see DESIGN.md: pydicom's dictionary has wrong meanings for some).
FINDING = ("121071", "Finding", "DCM")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("272519000", "Absent", "SCT")
CERTAINTY = ("111012", "Certainty of Finding", "DCM")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
STUDY_UID = ("110180", "Study Instance UID", "DCM")
PERCENT = ("%", "percent", "UCUM")

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def escape(value: Any) -> str:
    """Escape HL7 delimiters (| ^ & ~ \\) and line breaks in one value; None becomes ''."""
    if value is None:
        return ""
    text = "".join(_ESCAPES.get(ch, ch) for ch in str(value))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\.br\\")
    return _CONTROL.sub(" ", text)


def _components(*parts: Any) -> str:
    """Join escaped components with ^ and drop empty trailing ones."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def _coded(code: tuple[str, str, str]) -> str:
    return _components(*code)


def _timestamp(moment: datetime) -> str:
    text = moment.strftime("%Y%m%d%H%M%S")
    if moment.utcoffset() is not None:
        text += moment.strftime("%z")
    return text


def _patient_name(dicom_pn: str | None) -> str:
    """DICOM PN `Family^Given^Middle^Prefix^Suffix` to HL7 XPN `Family^Given^Middle^Suffix^Prefix`."""
    alphabetic = (dicom_pn or "").split("=")[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def _finding_code(job: dict) -> tuple[str, str, str]:
    """The coded finding from the job result: `finding` = {value|code, scheme, meaning}."""
    finding = job.get("finding") or {}
    value = finding.get("value") or finding.get("code") or job.get("finding_code")
    if not value:
        return FINDING
    meaning = finding.get("meaning") or job.get("finding_meaning") or ""
    scheme = finding.get("scheme") or job.get("finding_scheme") or ""
    return (str(value), str(meaning), str(scheme))


def _job_view(job: dict) -> dict:
    """Accept an API job row (model, present, ...) or a state-DB job row (model_name, result)."""
    result = job.get("result") or {}
    if isinstance(result, str):
        result = json.loads(result or "{}")
    view = dict(result)
    view.update({k: v for k, v in job.items() if k != "result" and (v is not None or k not in view)})
    view["model"] = job.get("model") or job.get("model_name") or result.get("model") or ""
    return view


def _segment(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def _obx(set_id: int, value_type: str, identifier: str, value: str, *, units: str = "",
         abnormal: str = "", observed: str = "") -> str:
    # OBX-1..14: set id, type, identifier, sub-id, value, units, range, flags, probability,
    # nature, status (P), effective date of reference range, user access checks, observed at.
    return _segment("OBX", str(set_id), value_type, identifier, "1", value, units, "", abnormal,
                    "", "", "P", "", "", observed)


def build_oru_r01(study: dict, job: dict, *, sending_facility: str, receiving_application: str,
                  control_id: str, now: datetime) -> str:
    """Build an HL7 v2.5 ORU^R01 preliminary result for one job of one study.

    `study` is a worklist row (patient_name, patient_id, accession, study_uid, modality);
    `job` is a job row (model, model_version, present, certainty, reason) with the coded
    finding under `finding` ({value, scheme, meaning}); without it the generic
    (121071, DCM, "Finding") is used. A state-DB job row (model_name, and the analysis result
    as a dict or JSON under `result`) is read the same way. Segments are separated by CR, as HL7 requires.
    """
    job = _job_view(job)
    stamp = _timestamp(now)
    accession = study.get("accession") or ""
    study_uid = study.get("study_uid") or ""
    model = job.get("model") or ""
    version = job.get("model_version") or ""
    finding = _finding_code(job)
    analysed = job.get("present") is not None  # a verdict exists; otherwise "not analysed"

    msh = "MSH|^~\\&|" + _segment(
        escape(SENDING_APPLICATION), escape(sending_facility), escape(receiving_application), "",
        stamp, "", "ORU^R01^ORU_R01", escape(control_id), "P", HL7_VERSION, "", "", "", "", "",
        "UNICODE UTF-8")  # MSH-18 character set
    pid = _segment("PID", "1", "", _components(study.get("patient_id") or "", "", "", "", "MR"), "",
                   _patient_name(study.get("patient_name")))
    service = _components(model, f"AI {model} {version}".strip(), "99BEFUND")
    orc = _segment("ORC", "RE", "", escape(accession), "", "CM", "", "", "", stamp)
    # OBR-3 filler order number and OBR-18 (placer field 1, IHE) carry the accession number;
    # OBR-24 the diagnostic section (the modality), OBR-25 the result status P (preliminary).
    obr = _segment("OBR", "1", "", escape(accession), service, "", "", stamp, "", "", "", "", "",
                   "", "", "", "", "", escape(accession), "", "", "", stamp, "",
                   escape(study.get("modality") or job.get("modality") or ""), "P")
    # ZDS-1: the Study Instance UID, as IHE Radiology carries it (uid^application^Application^DICOM).
    zds = _segment("ZDS", _components(study_uid, SENDING_APPLICATION, "Application", "DICOM"))

    obx: list[str] = []
    if analysed:
        present = bool(job.get("present"))
        obx.append(_obx(len(obx) + 1, "CWE", _coded(finding), _coded(PRESENT if present else ABSENT),
                        abnormal="A" if present else "N", observed=stamp))
        certainty = job.get("certainty")
        if certainty is not None:
            obx.append(_obx(len(obx) + 1, "NM", _coded(CERTAINTY), f"{100.0 * float(certainty):.1f}",
                            units=_coded(PERCENT), observed=stamp))
        verdict = "PRESENT" if present else "absent"
        text = f"AI preliminary result, not verified by a physician: {finding[1] or 'finding'} {verdict}"
        if certainty is not None:
            text += f" (certainty {100.0 * float(certainty):.0f}%)"
    else:
        reason = job.get("reason") or job.get("last_error") or "no reason given"
        text = f"Not analysed: {reason}"
    obx.append(_obx(len(obx) + 1, "TX", _coded(finding) if not analysed else _components(
        "59776-5", "Procedure findings", "LN"), escape(text), observed=stamp))
    obx.append(_obx(len(obx) + 1, "ST", _coded(ALGORITHM_NAME), escape(model), observed=stamp))
    obx.append(_obx(len(obx) + 1, "ST", _coded(ALGORITHM_VERSION), escape(version), observed=stamp))
    obx.append(_obx(len(obx) + 1, "ST", _coded(STUDY_UID), escape(study_uid), observed=stamp))
    return SEGMENT_SEP.join([msh, pid, orc, obr, zds, *obx]) + SEGMENT_SEP


def _field(segment: str, index: int) -> str:
    fields = segment.split("|")
    return fields[index] if index < len(fields) else ""


def _control_id(message: str) -> str:
    msh = message.split(SEGMENT_SEP, 1)[0]
    # MSH-1 is the field separator itself, so MSH-10 is split index 9.
    return _field(msh, 9)


def send_mllp(host: str, port: int, message: str, timeout: float) -> str:
    """Send one HL7 message with MLLP framing and return the ACK text.

    Raises DeliveryError when the peer cannot be reached, does not answer within `timeout`
    seconds (in all), or answers with a negative acknowledgement (AE/AR/CE/CR).
    """
    deadline = time.monotonic() + timeout
    where = f"HL7 receiver {host}:{port}"
    frame = MLLP_START + message.encode("utf-8") + MLLP_END
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(frame)
            buffer = b""
            while MLLP_END not in buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeliveryError(f"{where}: no ACK within {timeout:g} s")
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise DeliveryError(f"{where} closed the connection without an ACK")
                buffer += chunk
                if len(buffer) > MAX_ACK_BYTES:
                    raise DeliveryError(f"{where} sent more than {MAX_ACK_BYTES} bytes without an ACK")
    except DeliveryError:
        raise
    except TimeoutError as exc:
        raise DeliveryError(f"{where}: no ACK within {timeout:g} s") from exc
    except OSError as exc:
        raise DeliveryError(f"{where} unreachable: {exc.strerror or exc}") from exc
    start = buffer.find(MLLP_START)
    ack = buffer[start + 1 if start >= 0 else 0:buffer.index(MLLP_END)].decode("utf-8", "replace")
    _check_ack(ack, _control_id(message), where)
    return ack


def _check_ack(ack: str, control_id: str, where: str) -> None:
    segments = [s for s in re.split(r"[\r\n]+", ack) if s]
    msa = next((s for s in segments if s.startswith("MSA")), None)
    if msa is None:
        raise DeliveryError(f"{where} answered without an MSA segment")
    code = _field(msa, 1)
    if code not in ("AA", "CA"):
        detail = _field(msa, 3)
        err = next((s for s in segments if s.startswith("ERR")), "")
        raise DeliveryError(f"{where} rejected message {control_id}: {code} {detail} {err}".strip())
    if control_id and _field(msa, 2) != control_id:
        raise DeliveryError(f"{where} acknowledged {_field(msa, 2)!r}, not message {control_id!r}")
