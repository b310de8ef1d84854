"""Orthanc's auto-forward (service/orthanc_autoforward.lua) sends each instance to befund once:
not again when befund's SR arrives in the study, and for late instances only those.

Counted on both sides: befund's own counters of acknowledged instances (new plus
duplicates, from /metrics) and Orthanc's store jobs to befund. One node, one Orthanc.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.orthanc_peer import ORTHANC, OrthancPeer

pytestmark = pytest.mark.skipif(not Path(ORTHANC).exists() or not have_dcmtk(),
                                reason="needs Debian's orthanc and dcmtk")

SLICES = 20


@pytest.fixture(scope="module")
def node_and_pacs(tmp_path_factory):
    work = tmp_path_factory.mktemp("forward-once")
    node = RunningNode(work / "node")
    with OrthancPeer(node.config["ae_title"], node.dicom_port, lua=True, stable_age=2) as pacs:
        node.config["destinations"] = [f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}"]
        with node:
            yield node, pacs, work


def received_by_befund(node: RunningNode) -> int:
    """CT instances befund acknowledged: new ones plus ones it already had."""
    _, text = node.api("/metrics", token=None)
    total = 0.0
    for line in text.splitlines():
        for name in ("befund_instances_received_total", "befund_instances_duplicate_total"):
            if line.startswith(name + '{modality="CT"}'):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def store_jobs_to_befund(pacs: OrthancPeer) -> list[dict]:
    return [j for j in pacs.jobs() if j["Type"] == "DicomModalityStore"]


def settled(pacs: OrthancPeer, study_uid: str) -> bool:
    """The study is stable in Orthanc (its stable events have fired) and no job is pending."""
    study = pacs.rest_post("/tools/lookup", study_uid.encode())  # raw body: the UID
    orthanc_id = next(r["ID"] for r in study if r["Type"] == "Study")
    if not pacs.rest_get(f"/studies/{orthanc_id}")["IsStable"]:
        return False
    return all(j["State"] in ("Success", "Failure") for j in pacs.jobs())


def late_slice(series: list[Path], out: Path) -> Path:
    """One more slice of the same series, above the last one."""
    ds = pydicom.dcmread(series[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(ds.InstanceNumber) + 1
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 5.0]
    ds.save_as(out, enforce_file_format=True)
    return out


def test_orthanc_forwards_each_instance_once_also_after_the_sr_arrives_and_for_late_ones(node_and_pacs):
    node, pacs, work = node_and_pacs
    files = write_ct_series(work / "ct", finding="subdural", slices=SLICES, seed=9601)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sent = run_storescu(files, port=pacs.dicom_port, called_ae=pacs.ae, timeout=120)
    assert sent.returncode == 0, sent.output
    pacs.wait_for(lambda: pacs.find_series(study_uid, "SR"), 180, "befund's SR in Orthanc")
    # The SR restarted the study's stable timer; wait until the study is stable again and
    # every job Orthanc queued then has finished: an OnStableStudy script re-sent the CT here.
    pacs.wait_for(lambda: settled(pacs, study_uid), 60, "the study stable with the SR in it")
    assert received_by_befund(node) == SLICES
    jobs = store_jobs_to_befund(pacs)
    assert len(jobs) == 1 and jobs[0]["Content"]["InstancesCount"] == SLICES
    assert "not forwarding series" in pacs.log_tail(20_000)  # the SR series, by modality

    # A late slice: the series is stable again and only that instance is forwarded.
    late = late_slice(files, work / "late.dcm")
    assert run_storescu([late], port=pacs.dicom_port, called_ae=pacs.ae).returncode == 0
    poll(lambda: len(store_jobs_to_befund(pacs)) == 2, 60, 0.2, "the late slice forwarded")
    pacs.wait_for(lambda: settled(pacs, study_uid), 60, "the late slice's job finished")
    poll(lambda: received_by_befund(node) == SLICES + 1, 30, 0.2, "befund has the late slice")
    node.wait_study_state(study_uid, {"delivered"}, timeout=120)
    pacs.wait_for(lambda: len(pacs.find_series(study_uid, "SR")) >= 1 and settled(pacs, study_uid), 60,
                  "the second run's SR in Orthanc, the study stable")
    assert received_by_befund(node) == SLICES + 1
    assert sorted(j["Content"]["InstancesCount"] for j in store_jobs_to_befund(pacs)) == [1, SLICES]
