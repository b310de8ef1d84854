"""Head-CT triage end to end: DCMTK storescu -> the running node -> DCMTK storescp as the PACS.

One node and one PACS serve this module; each test uses its own phantom study (own seed).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from phantoms.ct_head import write_ct_series
from pipelines.sr_reading import read_result_sr
from tests.dicom_peers import StoreSCP, have_dcmtk, run_echoscu, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import ANY_OBJECT_ARGS, results_for_study
from tests.validators import dciodvfy_errors, dsrdump_ok

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SLICES = 24
# storescu proposes a compressed syntax only when told to (it converts otherwise, and cannot).
PROPOSE = {"explicit": (), "implicit": (), "jpeg-lossless": ("-xs",), "j2k-lossless": ("-xv",),
           "rle": ("-xr",)}


def srs_for_study(pacs: StoreSCP, study_uid: str) -> list[pydicom.Dataset]:
    return results_for_study(pacs.directory, study_uid, "SR")


def send_phantom(node, tmp_path, finding, seed, transfer_syntax="explicit", slices=SLICES):
    paths = write_ct_series(tmp_path / f"{finding}-{seed}", finding=finding, slices=slices,
                            seed=seed, transfer_syntax=transfer_syntax)
    result = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120,
                          extra_args=PROPOSE[transfer_syntax])
    assert result.returncode == 0, result.output
    return paths, pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID


def wait_for_srs(pacs, study_uid, n=1, timeout=90):
    return poll(lambda: (lambda s: s if len(s) >= n else None)(srs_for_study(pacs, study_uid)),
                timeout, 0.2, f"{n} SR(s) for study {study_uid} at the PACS")


def test_c_echo_is_answered(node):
    assert run_echoscu(port=node.dicom_port).returncode == 0


@pytest.mark.parametrize("finding,seed,present", [("subdural", 9101, True), ("none", 9102, False)])
def test_phantom_comes_back_as_one_air_sr(node, pacs, tmp_path, finding, seed, present):
    paths, study_uid = send_phantom(node, tmp_path, finding, seed)
    [sr] = wait_for_srs(pacs, study_uid)
    info = read_result_sr(sr)
    assert info["present"] is present
    assert 0.5 <= info["certainty"] <= 1.0
    assert info["algorithm"]["name"] == "ich_ct"
    assert info["algorithm"]["version"]
    assert any("threshold" in p for p in info["algorithm"]["parameters"])
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    refs = set(info["referenced_sop_instance_uids"])
    assert refs and refs <= sent
    assert sr.SeriesInstanceUID not in {pydicom.dcmread(paths[0]).SeriesInstanceUID}
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert dciodvfy_errors(sr.filename) == []
    assert dsrdump_ok(sr.filename)
    study = node.wait_study_state(study_uid, {"delivered"})
    assert study["present"] is present and study["model"] == "ich_ct"
    assert study["jobs"][0]["timings"]["infer"] > 0


@pytest.mark.parametrize("syntax,seed", [("implicit", 9111), ("jpeg-lossless", 9112),
                                         ("j2k-lossless", 9113), ("rle", 9114)])
def test_every_transfer_syntax_is_analysed(node, pacs, tmp_path, syntax, seed):
    _, study_uid = send_phantom(node, tmp_path, "epidural", seed, transfer_syntax=syntax)
    [sr] = wait_for_srs(pacs, study_uid)
    assert read_result_sr(sr)["present"] is True


def test_too_few_slices_comes_back_as_not_analysed_with_reason(node, pacs, tmp_path):
    _, study_uid = send_phantom(node, tmp_path, "none", 9121, slices=3)
    [sr] = wait_for_srs(pacs, study_uid)
    info = read_result_sr(sr)
    assert info["present"] is None
    assert "3 slice" in info["not_analysed_reason"] and "16" in info["not_analysed_reason"]
    assert dciodvfy_errors(sr.filename) == []
    study = node.wait_study_state(study_uid, {"not analysed"})
    assert "16" in study["reason"]


def test_resent_instances_start_no_new_run_and_late_ones_do(node, pacs, tmp_path):
    paths = write_ct_series(tmp_path / "late", finding="intraparenchymal", slices=24, seed=9131)
    first_part, late = paths[:18], paths[18:]
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    assert run_storescu(first_part, ae="MODALITY", port=node.dicom_port).returncode == 0
    [first] = wait_for_srs(pacs, study_uid)
    node.wait_study_state(study_uid, {"delivered"})
    # The same instances again, and an explicit trigger: no second run, and it says why.
    assert run_storescu(first_part, ae="MODALITY", port=node.dicom_port).returncode == 0
    status, body = node.api(f"/studies/{study_uid}/run", method="POST")
    assert status == 409 and "nothing new since run 1" in body["error"], body
    study = node.wait_study_state(study_uid, {"delivered"})
    assert [j["run"] for j in study["jobs"]] == [1]
    # Late instances of the same series: a second, versioned run with new UIDs.
    assert run_storescu(late, ae="MODALITY", port=node.dicom_port).returncode == 0
    srs = wait_for_srs(pacs, study_uid, n=2)
    assert len({s.SOPInstanceUID for s in srs}) == 2
    assert len({s.SeriesInstanceUID for s in srs}) == 2
    study = node.wait_study_state(study_uid, {"delivered"})
    assert sorted((j["run"], j["model"]) for j in study["jobs"]) == [(1, "ich_ct"), (2, "ich_ct")]
    assert study["instance_count"] == 24
    assert first.SOPInstanceUID in {s.SOPInstanceUID for s in srs}


def test_api_needs_the_token_but_health_and_metrics_do_not(node, pacs, tmp_path):
    _, study_uid = send_phantom(node, tmp_path, "none", 9151, slices=2)
    node.wait_study_state(study_uid, {"not analysed"})
    assert node.api("/studies", token=None)[0] == 401
    assert node.api("/studies", token="wrong")[0] == 401
    assert node.api("/studies")[0] == 200
    assert node.api("/healthz", token=None)[0] == 200
    cli = node.befund_status()
    assert cli.returncode == 0 and cli.stdout.splitlines()[-1] == "ready", cli.stdout + cli.stderr
    assert "ok    dicom" in cli.stdout and "FAIL" not in cli.stdout
    status, text = poll(lambda: (lambda r: r if "befund_time_to_result_seconds" in r[1] else None)(
        node.api("/metrics", token=None)), 30, 0.2, "delivery observed in /metrics")
    assert status == 200
    for name in ("befund_instances_received_total", "befund_bytes_received_total",
                 "befund_associations_total", "befund_jobs", "befund_stage_duration_seconds",
                 "befund_time_to_result_seconds"):
        assert name in text, name


def test_calling_ae_outside_allow_list_is_rejected(tmp_path):
    with RunningNode(tmp_path / "node", allow=["CT_ONLY@127.0.0.1/32"]) as n:
        assert run_echoscu(ae="STRANGER", port=n.dicom_port).returncode != 0
        assert run_echoscu(ae="CT_ONLY", port=n.dicom_port).returncode == 0


def test_restart_with_a_job_in_flight_delivers_exactly_one_sr(tmp_path):
    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=ANY_OBJECT_ARGS) as pacs:
        node = RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs.port}")
        node.start()
        try:
            # A long series keeps the job running for a few seconds: kill it mid-analysis.
            paths, study_uid = send_phantom(node, tmp_path, "subdural", 9141, slices=160)
            node.wait_study_state(study_uid, {"running"}, timeout=60)
            node.kill()
            assert Path(node.var / "state.sqlite").exists()
            node.start()
            node.wait_study_state(study_uid, {"delivered"}, timeout=90)
            srs = wait_for_srs(pacs, study_uid)
            assert len({s.SOPInstanceUID for s in srs}) == 1
        finally:
            node.stop()
