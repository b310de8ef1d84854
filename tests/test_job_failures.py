"""A job that fails in any stage ends after `job_max_attempts`, says which stage and why, and still
sends a "not analysed" SR when one can be made.

One real node (`befund serve`, `job_max_attempts: 2`) and a storescp PACS serve the module.
Real inputs break two stages: a head CT whose birth date the SR encoder refuses (SR encoding;
its "not analysed" SR is made from a reduced header), and a results folder that cannot be
created (saving). The other stages, SEG encoding of a slide among them (a slide without
TotalPixelMatrixOriginSequence, the security review's reproduction, is now encoded with the
documented default origin: tests/test_wsi_seg.py), are reached through the `fault_injection`
test hook (service/job_failures.py), which the node accepts only with BEFUND_TESTING=1.

In-process, with the real state DB: a node that dies during a job on every start (a child
process that SIGKILLs itself in the analysis) runs out of attempts, and an analysis longer
than the job lease is not leased a second time.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from phantoms.ct_head import write_ct_series
from phantoms.wsi_slide import write_wsi_slide
from pipelines.findings import AnalysisResult
from pipelines.sr_reading import read_result_sr
from service.config import Config, ConfigError, load_config
from service.job_failures import describe_error
from service.node import Node
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import PROJECT, REFERENCE_MODELS, RunningNode, poll
from tests.pacs_results import results_for_study

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

MAX_ATTEMPTS = 2
INJECTED = ("analysis", "encode_sr", "deliveries", "result_row")
LABELS = {"analysis": "analysis", "encode_sr": "SR encoding", "deliveries": "building the deliveries",
          "result_row": "recording the result"}
BAD_BIRTH_DATE = "19xx"
PROPOSE_JPEG = ("-xy",)  # storescu would otherwise try to decompress JPEG baseline, and fail
FINAL = 240.0  # seconds: two attempts with a 2 s backoff, on a loaded machine


def ct(folder: Path, seed: int, **header: str) -> tuple[list[Path], pydicom.Dataset]:
    paths = write_ct_series(folder, finding="none", slices=16, seed=seed)
    if header:
        for p in paths:
            ds = pydicom.dcmread(p)
            for keyword, value in header.items():
                setattr(ds, keyword, value)
            ds.save_as(p, enforce_file_format=True)
    return paths, pydicom.dcmread(paths[0], stop_before_pixels=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, tuple[list[Path], pydicom.Dataset]]:
    """The series of this module, written before the node starts (the hook names their UIDs)."""
    work = tmp_path_factory.mktemp("inputs")
    out = {stage: ct(work / stage, 7201 + i) for i, stage in enumerate(INJECTED)}
    out["bad_birth_date"] = ct(work / "bad-birth-date", 7211, PatientBirthDate=BAD_BIRTH_DATE)
    out["unsaveable"] = ct(work / "unsaveable", 7212)
    slide = write_wsi_slide(work / "slide", width=3072, height=2304, tumor=0.3, seed=7301)
    for p in slide:  # as scanners that leave the optional origin out write it
        ds = pydicom.dcmread(p)
        del ds.TotalPixelMatrixOriginSequence
        ds.save_as(p, enforce_file_format=True)
    out["slide_without_origin"] = (slide, pydicom.dcmread(slide[0], stop_before_pixels=True))
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs, inputs):
    faults = {str(inputs[stage][1].SeriesInstanceUID): stage for stage in INJECTED}
    faults[str(inputs["slide_without_origin"][1].SeriesInstanceUID)] = "encode_seg"
    with RunningNode(tmp_path_factory.mktemp("node"), pacs=f"PACS@127.0.0.1:{pacs.port}",
                     env={"BEFUND_TESTING": "1"}, job_max_attempts=MAX_ATTEMPTS,
                     fault_injection=faults) as n:
        yield n


def analysis_kept(node: RunningNode, job_id: int) -> int:
    """How many attempts of the job reused an earlier attempt's analysis instead of running the
    model (the node's log; its metrics are no count here: every `bentoml serve` on the machine
    empties the shared Prometheus directory when it starts)."""
    return node.log_path.read_text(errors="replace").count(
        f"job {job_id}: the analysis of an earlier attempt is kept; not run again")


def send(node: RunningNode, paths: list[Path], *extra: str) -> None:
    sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120, extra_args=extra)
    assert sent.returncode == 0, sent.output


def failed_study(node: RunningNode, header: pydicom.Dataset, label: str) -> tuple[dict, dict]:
    """The study once it is "not analysed", its failed job, and the checks every stage shares."""
    study_uid = header.StudyInstanceUID
    study = node.wait_study_state(study_uid, {"not analysed"}, timeout=FINAL)
    [job] = study["jobs"]
    assert job["state"] == "failed" and job["attempts"] == MAX_ATTEMPTS, job
    assert job["stage"] == label, job
    expected = f"internal error in {label} after {MAX_ATTEMPTS} attempt(s): "
    assert study["reason"].startswith(expected), study["reason"]
    assert job["last_error"] and job["last_error"] in study["reason"]
    [row] = [r for r in node.api("/studies")[1]["studies"] if r["study_uid"] == study_uid]
    assert row["state"] == "not analysed" and row["reason"] == study["reason"]  # the worklist's row
    return study, job


def not_analysed_sr_at_pacs(pacs, study_uid: str, label: str) -> pydicom.Dataset:
    def complete_sr() -> pydicom.Dataset | None:
        found = results_for_study(pacs.directory, study_uid, "SR")
        try:  # storescp writes in place: a file still being written may parse, but not whole
            return found[0] if found and read_result_sr(found[0]).get("not_analysed_reason") else None
        except Exception:  # noqa: BLE001 - the next poll reads it whole
            return None

    sr = poll(complete_sr, 60, 0.25, f"the not-analysed SR of {study_uid} at the PACS")
    assert len(results_for_study(pacs.directory, study_uid, "SR")) == 1
    info = read_result_sr(sr)
    assert info["present"] is None and f"internal error in {label}" in info["not_analysed_reason"]
    return sr


@pytest.mark.parametrize("stage", INJECTED)
def test_a_failure_injected_into_a_stage_ends_as_not_analysed_with_stage_and_error(
        node, pacs, inputs, stage):
    paths, header = inputs[stage]
    send(node, paths)
    study, job = failed_study(node, header, LABELS[stage])
    assert job["last_error"].startswith("InjectedFault: fault injected into"), job
    # an analysis that succeeded is kept: the second attempt did not run the model again
    assert analysis_kept(node, job["id"]) == (0 if stage == "analysis" else 1)
    dicom = [d for d in study["deliveries"] if d["kind"] == "dicom"]
    if stage in ("analysis", "result_row"):
        not_analysed_sr_at_pacs(pacs, header.StudyInstanceUID, LABELS[stage])
        assert [d["state"] for d in node.wait_study_state(
            header.StudyInstanceUID, {"not analysed"})["deliveries"]] == ["delivered"]
    elif stage == "encode_sr":  # the SR encoder itself fails: reported without an SR
        assert dicom == [] and 'no "not analysed" SR could be made: SR encoding failed' in study["reason"]
    else:  # no deliveries can be built: recorded without them
        assert study["deliveries"] == [] and "no delivery could be queued" in study["reason"]


def test_a_slide_whose_seg_encoding_fails_gets_its_not_analysed_sr_at_the_pacs_and_no_seg(
        node, pacs, inputs):
    paths, header = inputs["slide_without_origin"]
    send(node, paths, *PROPOSE_JPEG)
    study, job = failed_study(node, header, "SEG encoding")
    assert job["last_error"].startswith("InjectedFault: fault injected into SEG encoding"), job
    assert analysis_kept(node, job["id"]) == 1, "the slide was analysed again"
    not_analysed_sr_at_pacs(pacs, header.StudyInstanceUID, "SEG encoding")
    assert results_for_study(pacs.directory, header.StudyInstanceUID, "SEG") == []


def test_a_header_the_sr_encoder_refuses_still_gets_a_not_analysed_sr_without_patient_data_in_the_error(
        node, pacs, inputs):
    paths, header = inputs["bad_birth_date"]
    send(node, paths)
    study, job = failed_study(node, header, "SR encoding")
    assert analysis_kept(node, job["id"]) == 1
    for text in (study["reason"], job["last_error"], node.log_tail(400)):
        assert BAD_BIRTH_DATE not in text
        assert str(header.PatientID) not in text
    sr = not_analysed_sr_at_pacs(pacs, header.StudyInstanceUID, "SR encoding")
    assert sr.PatientID == header.PatientID and sr.StudyInstanceUID == header.StudyInstanceUID
    assert not sr.get("PatientBirthDate")  # the reduced header left the refused value out


def test_a_results_folder_that_cannot_be_written_is_reported_without_an_sr(node, pacs, inputs):
    paths, header = inputs["unsaveable"]
    db = sqlite3.connect(f"file:{node.var / 'state.sqlite'}?mode=ro", uri=True)
    try:
        next_job = (db.execute("SELECT MAX(id) FROM jobs").fetchone()[0] or 0) + 1
    finally:
        db.close()
    blocker = node.var / "results" / f"job-{next_job}"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")  # a file where the job's results folder must go
    send(node, paths)
    study, job = failed_study(node, header, "saving the result files")
    assert job["id"] == next_job and analysis_kept(node, job["id"]) == 1
    assert 'no "not analysed" SR could be made: saving the result files failed' in study["reason"]
    assert study["deliveries"] == [] or all(d["kind"] != "dicom" for d in study["deliveries"])


# --- the test hook and the error text -------------------------------------------------------------


def test_the_fault_injection_hook_is_refused_unless_testing(tmp_path):
    path = tmp_path / "befund.yaml"
    path.write_text(yaml.safe_dump({"fault_injection": {"1.2.3": "encode_seg"}}))
    with pytest.raises(ConfigError, match="BEFUND_TESTING"):
        load_config(path, env={})
    assert load_config(path, env={"BEFUND_TESTING": "1"}).fault_injection == (("1.2.3", "encode_seg"),)
    path.write_text(yaml.safe_dump({"fault_injection": {"1.2.3": "everything"}}))
    with pytest.raises(ConfigError, match="not a stage"):
        load_config(path, env={"BEFUND_TESTING": "1"})


def test_an_error_text_keeps_type_and_words_but_no_patient_values():
    exc = ValueError("Unable to convert '19xx' to 'DA' object for Doe^Jane (PID-4711); "
                     "'FileDataset' object has no attribute 'TotalPixelMatrixOriginSequence'\n")
    text = describe_error(exc, ["Doe^Jane", "PID-4711", ""])
    assert text.startswith("ValueError: Unable to convert '...' to 'DA' object")
    for secret in ("19xx", "Doe", "Jane", "4711"):
        assert secret not in text
    assert "'TotalPixelMatrixOriginSequence'" in text and "\n" not in text
    assert len(describe_error(RuntimeError("x" * 5000))) <= 300


# --- in-process: crash loops and long analyses -----------------------------------------------------


def in_process_node(var: Path, **config) -> Node:
    cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(var), min_free_bytes=0,
                 models_dir=str(REFERENCE_MODELS), token="t" * 32,
                 destinations=(), **config)
    return Node(cfg)


def queue_one_ct_job(var: Path, work: Path) -> tuple[int, str]:
    """Spool and index a head CT and create its job, as receive, completion and routing would."""
    node = in_process_node(var)
    try:
        paths = write_ct_series(work, finding="none", slices=16, seed=7401)
        for p in paths:
            node.db.record_instance(node.spool.store(p, association_id="a", move=False))
        [series] = node.db.series_receiving()
        [card] = [c for c in node.cards if c.name == "ich_ct"]
        job_id = node.db.create_job_if_new(series, card.name, card.version, 0, time.time())
        return job_id, series.study_uid
    finally:
        node.stop()


DYING_NODE = textwrap.dedent("""
    import os, signal, sys, threading
    from pathlib import Path
    from service.config import Config
    from service.node import Node
    node = Node(Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=sys.argv[1], min_free_bytes=0,
                       models_dir=sys.argv[2], token="t" * 32, job_max_attempts=2))
    def analyse(model, paths):
        os.kill(os.getpid(), signal.SIGKILL)  # the node dies in the analysis (OOM kill, segfault)
    node.start_jobs(analyse)
    threading.Event().wait(120)
""")


def test_a_job_the_node_dies_in_on_every_start_ends_after_the_last_attempt(tmp_path):
    var = tmp_path / "var"
    job_id, study_uid = queue_one_ct_job(var, tmp_path / "ct")
    for _ in range(MAX_ATTEMPTS):  # the node starts and dies in the job, twice
        died = subprocess.run([sys.executable, "-c", DYING_NODE, str(var), str(REFERENCE_MODELS)],
                              cwd=PROJECT, capture_output=True, text=True, timeout=120)
        assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    node = in_process_node(var, job_max_attempts=MAX_ATTEMPTS)
    calls = []
    try:
        node.start_jobs(lambda model, paths: calls.append(model) or {})
        job = poll(lambda: (lambda j: j if j.state == "failed" else None)(node.db.job(job_id)),
                   60, 0.1, "the job given up")
    finally:
        node.stop()
    assert calls == [], "the job ran a third time"
    assert job.attempts == MAX_ATTEMPTS + 1 and job.stage == "analysis"
    reason = job.result["reason"]
    assert reason.startswith(f"internal error in analysis after {MAX_ATTEMPTS} attempt(s): "
                             "the node stopped while the job was running"), reason
    sr = pydicom.dcmread(var / "results" / f"job-{job_id}" / "sr.dcm")
    assert sr.StudyInstanceUID == study_uid
    assert "internal error in analysis" in read_result_sr(sr)["not_analysed_reason"]


def test_an_analysis_longer_than_the_job_lease_is_not_leased_twice(tmp_path):
    var = tmp_path / "var"
    job_id, _ = queue_one_ct_job(var, tmp_path / "ct")
    lease_s = 1.0
    node = in_process_node(var, job_lease_s=lease_s, job_workers=2)
    calls, release = [], threading.Event()

    def slow_analysis(model: str, paths: list[str]) -> dict:
        calls.append(model)
        release.wait(60)
        return AnalysisResult.not_analysed("test analysis").to_dict()

    try:
        node.start_jobs(slow_analysis)
        poll(lambda: calls, 30, 0.05, "the analysis started")
        started = time.time()
        # three lease periods pass while the first attempt still analyses
        poll(lambda: time.time() > started + 3 * lease_s, 10, 0.05, "three lease periods")
        job = node.db.job(job_id)
        assert len(calls) == 1 and job.attempts == 1 and job.state == "running", (calls, job)
        assert job.lease_until > time.time()
        release.set()
        poll(lambda: node.db.job(job_id).state == "not_analysed", 30, 0.05, "the job finished")
    finally:
        release.set()
        node.stop()
    assert len(calls) == 1
