"""Orthanc as the PACS: it stores what storescu sends, echoes befund, and its Lua script
auto-forwards a stable study's image series to befund (a DCMTK storescp stands in here) but
never an SR, so results cannot loop back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, run_storescu
from tests.orthanc_peer import ORTHANC, OrthancPeer

pytestmark = pytest.mark.skipif(not Path(ORTHANC).exists() or not shutil.which("storescu"),
                                reason="needs Debian's orthanc and dcmtk")

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def write_sr(path: Path, study_uid: str) -> Path:
    """A minimal Basic Text SR in the given study, as a result coming back from a node would be."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Phantom^Result"
    ds.PatientID = "PH-SR"
    ds.StudyDate = ds.ContentDate = "20250304"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [concept]
    ds.save_as(path, enforce_file_format=True)
    return path


def test_storescu_to_orthanc_is_found_through_rest(tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=4, seed=3)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with OrthancPeer("BEFUND", 11112, lua=False) as pacs:
        assert pacs.rest_get("/system")["DicomAet"] == "ORTHANC"
        sent = run_storescu(files, port=pacs.dicom_port, called_ae=pacs.ae)
        assert sent.returncode == 0, sent.output
        ids = pacs.wait_for(lambda: pacs.instances_in_study(study_uid), 10, "instances in Orthanc")
        assert len(ids) == 4
        [series] = pacs.find_series(study_uid, "CT")
        assert len(series["Instances"]) == 4
        assert pacs.find_series(study_uid, "SR") == []


def test_unknown_sender_is_refused(tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=1, seed=4)
    with OrthancPeer("BEFUND", 11112, lua=False) as pacs:
        refused = run_storescu(files, ae="INTRUDER", port=pacs.dicom_port, called_ae=pacs.ae)
        assert refused.returncode != 0, refused.output
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert pacs.instances_in_study(study_uid) == []


def test_orthanc_echoes_befund_and_forwards_images_but_not_sr(tmp_path):
    files = write_ct_series(tmp_path / "ct", slices=4, seed=5)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sr = write_sr(tmp_path / "result-sr.dcm", study_uid)
    received = tmp_path / "befund-in"
    with StoreSCP(received, ae="BEFUND") as befund, \
            OrthancPeer(befund.ae, befund.port, lua=True, stable_age=2) as pacs:
        assert pacs.echo_to("befund")
        sent = run_storescu([*files, sr], port=pacs.dicom_port, called_ae=pacs.ae)
        assert sent.returncode == 0, sent.output
        # The Lua callback logs its decision for every series; wait for both, then for the jobs.
        pacs.wait_for(lambda: "not forwarding series" in pacs.log_tail(200_000)
                      and "befund: forwarding series" in pacs.log_tail(200_000), 30, "OnStableStudy")
        pacs.wait_for(lambda: len(list(received.iterdir())) >= 4, 30, "CT at befund")
        pacs.wait_for(lambda: all(j["State"] in ("Success", "Failure") for j in pacs.jobs()), 30, "jobs")
        assert all(j["State"] == "Success" for j in pacs.jobs())
        got = [pydicom.dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
        assert sorted(ds.Modality for ds in got) == ["CT"] * 4
        assert {ds.StudyInstanceUID for ds in got} == {study_uid}
        assert len(pacs.instances_in_study(study_uid)) == 5  # the SR is stored, just not forwarded
