"""Links from a worklist row to the study in the PACS viewer, from the `viewer_url` template.

    viewer_url: "http://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}"
    viewer_url: "http://pacs:8042/app/explorer.html#study?uuid={orthanc_study_id}"   # Orthanc Explorer

Placeholders: `{study_uid}`, `{accession}` and `{orthanc_study_id}` (Orthanc's own ID of the
study, the SHA-1 of "PatientID|StudyInstanceUID" in its 8-hex groups, which its Explorer's
study page takes). Values are percent-encoded; the template is checked when the config loads
(http or https, known placeholders only), so a row's link can only lead to the viewer.
"""

from __future__ import annotations

import hashlib
import string
from typing import Any
from urllib.parse import quote, urlsplit

PLACEHOLDERS = frozenset({"study_uid", "accession", "orthanc_study_id"})


def check_template(template: str) -> str:
    """The template if it is an http(s) URL with known placeholders; ValueError otherwise."""
    if not template:
        return template
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ValueError(f"viewer_url: unknown placeholder(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(PLACEHOLDERS))}")
    probe = urlsplit(template.format(**{name: "x" for name in PLACEHOLDERS}))
    if probe.scheme not in ("http", "https") or not probe.netloc:
        raise ValueError(f"viewer_url must be an http:// or https:// address, not {template!r}")
    return template


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's identifier of a study (DicomInstanceHasher: SHA-1 of "PatientID|StudyUID")."""
    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode(), usedforsecurity=False).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def viewer_url(template: str, row: dict[str, Any]) -> str | None:
    """The row's study in the viewer; None without a template or a study UID."""
    if not template or not row.get("study_uid"):
        return None
    values = {
        "study_uid": row["study_uid"],
        "accession": row.get("accession") or "",
        "orthanc_study_id": orthanc_study_id(row.get("patient_id") or "", row["study_uid"]),
    }
    return template.format(**{k: quote(str(v), safe="") for k, v in values.items()})
