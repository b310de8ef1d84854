"""No patient names or IDs in logs: a full round trip through the real node, then a search.

A phantom study with a distinctive patient name and ID goes in over DICOM (plus refused
instances carrying the same patient, so the failure paths log too), is analysed and delivered
to a storescp PACS; then neither the name, nor its parts, nor the ID may appear in the node's
log or in any log file under its var dir.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import RunningNode

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

NAME_PARTS = ("Qwyxzorbel", "Fenwhistle")
PATIENT_NAME = "^".join(NAME_PARTS)
PATIENT_ID = "PID-ZX918273"
SECRETS = (*NAME_PARTS, PATIENT_ID, PATIENT_ID.removeprefix("PID-"))
FINAL_STATES = {"delivered", "not analysed", "delivery failed"}


def log_files(node: RunningNode) -> list[Path]:
    """The node's own log plus every file under its var dir that is a log."""
    found = [node.log_path]
    for p in node.var.rglob("*"):
        if p.is_file() and (p.suffix in {".log", ".txt", ".jsonl", ".out", ".err"}
                            or any(part.lower() in {"log", "logs"} for part in p.parts)):
            found.append(p)
    return found


def send_refused_copies(port: int, template: Path) -> list[int]:
    """The same patient in instances the node refuses (bad UID, SOP class mismatch)."""
    ae = AE(ae_title="MODALITY")
    ds = pydicom.dcmread(template)
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND")
    assert assoc.is_established
    statuses = []
    try:
        bad_uid = pydicom.dcmread(template)
        bad_uid.SeriesInstanceUID = "1.2.x/../" + PATIENT_ID
        bad_uid.SOPInstanceUID = bad_uid.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        statuses.append(int(assoc.send_c_store(bad_uid).Status))
    finally:
        assoc.release()
    return statuses


def test_round_trip_leaves_no_patient_name_or_id_in_any_log(tmp_path):
    paths = write_ct_series(tmp_path / "study", finding="subdural", slices=20, seed=4242,
                            patient_name=PATIENT_NAME)
    for p in paths:  # the phantom's own IDs are PHCT-<seed>; give this patient a distinctive one
        ds = pydicom.dcmread(p)
        ds.PatientID = PATIENT_ID
        ds.save_as(p)
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID

    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=("+B", "+xa", "-pm")) as pacs, \
            RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs.port}") as node:
        result = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
        assert result.returncode == 0, result.output
        assert all(s != 0x0000 for s in send_refused_copies(node.dicom_port, paths[0]))
        study = node.wait_study_state(study_uid, FINAL_STATES, timeout=120)
        assert study["state"] == "delivered", study
        assert list((tmp_path / "pacs").iterdir()), "the PACS received no result"

    files = log_files(node)
    text = {p: p.read_text(errors="replace") for p in files}
    assert "refused" in text[node.log_path] and study_uid in text[node.log_path]  # it did log
    leaks = [(str(p.relative_to(tmp_path)), s) for p, t in text.items() for s in SECRETS
             if s.lower() in t.lower()]
    assert leaks == [], f"patient data in logs: {leaks}"
