"""Orthanc as the PACS, the real node as the AI: storescu -> Orthanc -> (Lua OnStableSeries) ->
befund -> SR (and SEG for slides) back into the same study in Orthanc, found through its REST API.

One node and one Orthanc serve this module; each test uses its own phantom study (own seed).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from phantoms.ct_head import write_ct_series
from pipelines.sr_reading import read_result_sr
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import PROJECT, RunningNode
from tests.orthanc_peer import ORTHANC, OrthancPeer

pytestmark = pytest.mark.skipif(not Path(ORTHANC).exists() or not have_dcmtk(),
                                reason="needs Debian's orthanc and dcmtk")

SLICES = 24
WSI_MODEL = PROJECT / "models" / "tumor_wsi" / "model.onnx"


@pytest.fixture(scope="module")
def node_and_pacs(tmp_path_factory):
    work = tmp_path_factory.mktemp("round-trip")
    node = RunningNode(work / "node")
    with OrthancPeer(node.config["ae_title"], node.dicom_port, lua=True, stable_age=2) as pacs:
        node.config["destinations"] = [f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}"]
        with node:
            yield node, pacs


@pytest.fixture()
def node(node_and_pacs):
    return node_and_pacs[0]


@pytest.fixture()
def pacs(node_and_pacs):
    return node_and_pacs[1]


def study_uid_of(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def results_in_orthanc(pacs: OrthancPeer, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """The instances of `modality` that Orthanc holds for the study, as pydicom datasets."""
    out = []
    for series in pacs.find_series(study_uid, modality):
        for instance_id in series["Instances"]:
            raw = pacs.rest_get(f"/instances/{instance_id}/file")
            ds = pydicom.dcmread(io.BytesIO(raw))
            ds.orthanc_study = series["ParentStudy"]
            out.append(ds)
    return out


def wait_for_results(pacs, study_uid, modality="SR", n=1, timeout=120.0) -> list[pydicom.Dataset]:
    return pacs.wait_for(lambda: (lambda r: r if len(r) >= n else None)(
        results_in_orthanc(pacs, study_uid, modality)), timeout, f"{n} {modality}(s) in Orthanc")


def write_late_slice(series: list[Path], out: Path) -> Path:
    """One more slice of the same series, above the last one, as a scanner might send late."""
    ds = pydicom.dcmread(series[-1])
    below = pydicom.dcmread(series[-2], stop_before_pixels=True)
    step = float(ds.ImagePositionPatient[2]) - float(below.ImagePositionPatient[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(ds.InstanceNumber) + 1
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + step]
    if "SliceLocation" in ds:
        ds.SliceLocation = float(ds.SliceLocation) + step
    ds.save_as(out, enforce_file_format=True)
    return out


def orthanc_study_id(pacs: OrthancPeer, study_uid: str) -> str:
    [study] = pacs.rest_post("/tools/find", {"Level": "Study",
                                             "Query": {"StudyInstanceUID": study_uid}})
    return study


def send_to_orthanc(pacs, files, extra_args=()) -> None:
    sent = run_storescu(files, port=pacs.dicom_port, called_ae=pacs.ae, extra_args=extra_args,
                        timeout=180)
    assert sent.returncode == 0, sent.output


def test_c_echo_both_ways(node, pacs):
    # Orthanc -> befund, through Orthanc's own REST API.
    assert pacs.echo_to("befund")
    # befund -> Orthanc, with befund's calling AE title.
    ae = AE(ae_title=node.config["ae_title"])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.ae)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_bleed_ct_comes_back_as_present_sr_in_the_same_orthanc_study(node, pacs, tmp_path):
    files = write_ct_series(tmp_path / "bleed", finding="subdural", slices=SLICES, seed=9201)
    study_uid = study_uid_of(files[0])
    send_to_orthanc(pacs, files)
    [sr] = wait_for_results(pacs, study_uid)
    assert sr.StudyInstanceUID == study_uid
    assert sr.orthanc_study == orthanc_study_id(pacs, study_uid)  # one study, not a new one
    info = read_result_sr(sr)
    assert info["present"] is True
    assert info["algorithm"]["name"] == "ich_ct"
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    assert set(info["referenced_sop_instance_uids"]) <= sent
    assert sr.PreliminaryFlag == "PRELIMINARY"
    study = node.wait_study_state(study_uid, {"delivered"})
    assert study["present"] is True
    # Orthanc forwarded only the CT; the SR did not loop back into befund.
    assert {s["modality"] for s in study["series"]} == {"CT"}


def test_late_instance_makes_a_second_run_whose_sr_orthanc_keeps(node, pacs, tmp_path):
    files = write_ct_series(tmp_path / "first", finding="intraparenchymal", slices=20, seed=9202)
    study_uid = study_uid_of(files[0])
    send_to_orthanc(pacs, files)
    [first] = wait_for_results(pacs, study_uid)
    node.wait_study_state(study_uid, {"delivered"})
    late = write_late_slice(files, tmp_path / "late.dcm")
    send_to_orthanc(pacs, [*files, late])  # the whole study again, plus the late slice
    srs = wait_for_results(pacs, study_uid, n=2)
    assert len({s.SOPInstanceUID for s in srs}) == 2  # Orthanc dropped neither version
    assert len({s.SeriesInstanceUID for s in srs}) == 2
    assert first.SOPInstanceUID in {s.SOPInstanceUID for s in srs}
    assert {s.orthanc_study for s in srs} == {orthanc_study_id(pacs, study_uid)}
    study = node.wait_study_state(study_uid, {"delivered"})
    assert sorted(j["run"] for j in study["jobs"]) == [1, 2]


@pytest.mark.skipif(not WSI_MODEL.exists(),
                    reason="models/tumor_wsi/model.onnx is not trained yet (make train-wsi)")
def test_slide_comes_back_as_sr_and_heatmap_seg_in_the_same_orthanc_study(node, pacs, tmp_path):
    from phantoms.wsi_slide import write_wsi_slide

    files = write_wsi_slide(tmp_path / "slide", 4096, 3072, tumor=0.3, seed=9203)
    study_uid = study_uid_of(files[0])
    # -xy: also propose JPEG baseline, else storescu decompresses (and fails) for Orthanc.
    send_to_orthanc(pacs, files, extra_args=("-xy",))
    [sr] = wait_for_results(pacs, study_uid, "SR", timeout=240)
    [seg] = wait_for_results(pacs, study_uid, "SEG", timeout=60)
    study_id = orthanc_study_id(pacs, study_uid)
    assert sr.orthanc_study == seg.orthanc_study == study_id
    info = read_result_sr(sr)
    assert info["present"] is True
    assert info["algorithm"]["name"] == "tumor_wsi"
    assert seg.SegmentationType == "FRACTIONAL"
    assert node.wait_study_state(study_uid, {"delivered"})["present"] is True

