"""A SOP instance sent again never changes stored data silently: against the running node, with
DCMTK storescu and pynetdicom as the modality and DCMTK storescp as the PACS.

- The same data set again changes nothing (not even the file), and `POST /studies/{uid}/run`
  says why it starts nothing (409); with `{"force": true}` it runs again.
- Other content under the same UIDs is a new version beside the old file and a new, versioned
  run whose result replaces the old one on the worklist; the old SR stays at the PACS and the
  new SR names it in its Predecessor Documents Sequence (IHE AIR); the API shows both runs.
- When indexing a re-sent version fails, the acknowledged file stays as it was.
- The same SOP Instance UID under another study or series is refused (0xA900) and the earlier
  study is untouched, also after a restart with such a file left in the spool.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from phantoms.ct_head import write_ct_series
from pipelines.result_uids import result_uids
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, results_for_study

pytestmark = [pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

SLICES = 16  # the ICH model's minimum
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with StoreSCP(tmp_path_factory.mktemp("pacs"), ae="PACS", extra_args=PACS_ARGS) as scp:
        yield scp


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    with RunningNode(tmp_path_factory.mktemp("node"), pacs=f"PACS@127.0.0.1:{pacs.port}") as n:
        yield n


def send(node: RunningNode, paths: list[Path]) -> None:
    sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
    assert sent.returncode == 0, sent.output


def store(node: RunningNode, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE with pynetdicom (one association); the status of each."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="BEFUND")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait(node: RunningNode, study_uid: str, ok, what: str, timeout: float = 120) -> dict:
    def check():
        s = node.study(study_uid)
        return s if s and ok(s) else None

    try:
        return poll(check, timeout, 0.2, what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last: {node.study(study_uid)}\n{node.log_tail()}") from exc


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def with_uids_of(source: list[Path], content: list[Path], out: Path) -> list[Path]:
    """`content`'s pixels and headers under `source`'s UIDs, slice by slice: a re-send with
    other content."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for src, new in zip(source, content, strict=True):
        ds, uids = pydicom.dcmread(new), header(src)
        for keyword in UID_KEYWORDS:
            setattr(ds, keyword, uids.get(keyword))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(out / src.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def spool_files(node: RunningNode, study_uid: str, series_uid: str) -> list[Path]:
    folder = node.var / "spool" / study_uid / series_uid
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm") if folder.exists() else []


def db_rows(node: RunningNode, series_uid: str | None = None, sop: str | None = None) -> list[dict]:
    db = sqlite3.connect(f"file:{node.var / 'state.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM instances "
                          "WHERE (? IS NULL OR series_uid=?) AND (? IS NULL OR sop_instance_uid=?) "
                          "ORDER BY sop_instance_uid", (series_uid, series_uid, sop, sop)).fetchall()
        keys = ("sop_instance_uid", "study_uid", "series_uid", "path", "version")
        return [{k: r[k] if k in r.keys() else 1 for k in keys} for r in rows]
    finally:
        db.close()


def sr_of_run(pacs: StoreSCP, study_uid: str, run: int) -> pydicom.Dataset:
    [sr] = [s for s in results_for_study(pacs.directory, study_uid, "SR")
            if s.SeriesDescription.endswith(f"(run {run})")]
    return sr


def test_identical_resend_changes_nothing_and_run_says_why_not(node, pacs, tmp_path):
    paths = write_ct_series(tmp_path / "ct", finding="none", slices=SLICES, seed=7301)
    study, series = header(paths[0]).StudyInstanceUID, header(paths[0]).SeriesInstanceUID
    send(node, paths)
    wait(node, study, lambda s: s["state"] == "delivered", "run 1 delivered")
    files = {p: p.stat().st_ino for p in spool_files(node, study, series)}
    assert len(files) == SLICES

    send(node, paths)  # the same data sets again: acknowledged, nothing changes
    status, body = node.api(f"/studies/{study}/run", method="POST")
    assert status == 409, body
    assert f"series {series}: nothing new since run 1" in body["error"], body
    assert {p: p.stat().st_ino for p in spool_files(node, study, series)} == files  # not rewritten
    detail = node.study(study)
    assert [j["run"] for j in detail["jobs"]] == [1] and detail["instance_count"] == SLICES
    assert len(results_for_study(pacs.directory, study, "SR")) == 1

    status, body = node.api(f"/studies/{study}/run", method="POST", body={"force": True})
    assert status == 202 and body["series"] == [
        {"series_uid": series, "runs": True, "reason": "run again on request"}], body
    wait(node, study, lambda s: s["run"] == 2 and s["state"] == "delivered", "run 2 delivered")
    assert sr_of_run(pacs, study, 2).PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_of_run(pacs, study, 1).SOPInstanceUID


def test_changed_resend_is_a_new_version_and_its_run_supersedes_the_old_result(node, pacs, tmp_path):
    first = write_ct_series(tmp_path / "first", finding="none", slices=SLICES, seed=7302)
    study, series = header(first[0]).StudyInstanceUID, header(first[0]).SeriesInstanceUID
    send(node, first)
    one = wait(node, study, lambda s: s["state"] == "delivered", "run 1 delivered")
    assert (one["run"], one["present"]) == (1, False)

    # The same UIDs, other pixels: now with a bleed.
    bleed = write_ct_series(tmp_path / "bleed", finding="subdural", slices=SLICES, seed=7302)
    second = with_uids_of(first, bleed, tmp_path / "second")
    send(node, second)
    two = wait(node, study, lambda s: s["run"] == 2 and s["state"] == "delivered", "run 2 delivered")
    assert two["present"] is True and two["priority"] == "high" and two["instance_count"] == SLICES

    # The API shows both runs; the first is superseded by the second.
    runs = [(j["run"], j["state"], j["present"], j["superseded_by_run"]) for j in two["jobs"]]
    assert runs == [(1, "done", False, 2), (2, "done", True, None)], runs
    row = next(r for r in node.api("/studies")[1]["studies"] if r["study_uid"] == study)
    assert (row["run"], row["present"]) == (2, True)

    # The old SR stays at the PACS; the new one names it as its predecessor.
    old, new = sr_of_run(pacs, study, 1), sr_of_run(pacs, study, 2)
    [predecessor] = new.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study
    [referenced_series] = predecessor.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == old.SeriesInstanceUID
    [referenced] = referenced_series.ReferencedSOPSequence
    assert (referenced.ReferencedSOPClassUID, referenced.ReferencedSOPInstanceUID) == (
        old.SOPClassUID, old.SOPInstanceUID)
    key = next(m["key"] for m in node.api("/models")[1]["models"] if m["name"] == "ich_ct")
    assert new.SOPInstanceUID == result_uids(series, key, 2).sr_sop_uid  # deterministic per run

    # The spool holds the new versions only (slices the bleed does not reach came again
    # unchanged and stay version 1), and the DB points to them.
    changed = {header(a).SOPInstanceUID: pydicom.dcmread(a) != pydicom.dcmread(b)
               for a, b in zip(first, second, strict=True)}
    assert 0 < sum(changed.values()) < SLICES
    files = spool_files(node, study, series)
    assert [p.name for p in files] == sorted(f"{sop}.v2.dcm" if new else f"{sop}.dcm"
                                             for sop, new in changed.items())
    assert {(r["path"], r["version"]) for r in db_rows(node, series)} == {
        (str(p), 2 if changed[header(p).SOPInstanceUID] else 1) for p in files}
    sent = {header(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in second}
    assert all(pydicom.dcmread(p).PixelData == sent[header(p).SOPInstanceUID] for p in files)


def test_failed_index_of_a_resend_keeps_the_acknowledged_file(node, tmp_path):
    [path] = write_ct_series(tmp_path / "ct", finding="none", slices=1, seed=7303)
    original = pydicom.dcmread(path)
    sop = original.SOPInstanceUID
    assert store(node, [original]) == [0x0000]
    [row] = db_rows(node, sop=sop)
    kept = Path(row["path"])
    before = kept.read_bytes()

    changed = pydicom.dcmread(path)
    changed.PixelData = bytes(reversed(changed.PixelData))
    lock = sqlite3.connect(node.var / "state.sqlite", timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the state DB cannot take the new row
        assert store(node, [changed]) == [0xA700]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert kept.exists() and kept.read_bytes() == before, "the acknowledged file was changed or removed"
    assert db_rows(node, sop=sop) == [row]
    assert [p.name for p in spool_files(node, row["study_uid"], row["series_uid"])] == [kept.name]
    assert "not indexed, its new file removed (0xA700)" in node.log_tail(200)

    # Sent again once the DB is back: version 2 replaces it.
    assert store(node, [changed]) == [0x0000]
    [row2] = db_rows(node, sop=sop)
    assert row2["version"] == 2 and not kept.exists()
    assert pydicom.dcmread(row2["path"]).PixelData == changed.PixelData


def test_a_restart_after_a_crash_between_two_versions_keeps_exactly_one(node, tmp_path):
    """The crash points of a new version: after its row was committed but before the old file
    went, and after its file got its name but before its row was committed (plus a leftover
    copy identical to the indexed version). The spool reconcile at start settles each."""
    paths = write_ct_series(tmp_path / "ct", finding="none", slices=2, seed=7305)
    first, other = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1])
    assert store(node, [first, other]) == [0x0000, 0x0000]
    second = pydicom.dcmread(paths[0])
    second.PixelData = bytes(reversed(second.PixelData))
    assert store(node, [second]) == [0x0000]  # version 2 of the first instance
    [row] = db_rows(node, sop=first.SOPInstanceUID)
    folder = Path(row["path"]).parent
    assert row["version"] == 2
    node.stop()
    first.save_as(folder / f"{first.SOPInstanceUID}.dcm", enforce_file_format=True)  # not removed
    third = pydicom.dcmread(paths[0])
    third.PixelData = bytes(len(third.PixelData))
    third.save_as(folder / f"{first.SOPInstanceUID}.v3.dcm", enforce_file_format=True)  # not indexed
    other.save_as(folder / f"{other.SOPInstanceUID}.v2.dcm", enforce_file_format=True)  # same content
    node.start()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{first.SOPInstanceUID}.v3.dcm", f"{other.SOPInstanceUID}.dcm"])
    versions = {r["sop_instance_uid"]: (Path(r["path"]).name, r["version"])
                for r in db_rows(node, row["series_uid"])}
    assert versions == {first.SOPInstanceUID: (f"{first.SOPInstanceUID}.v3.dcm", 3),
                        other.SOPInstanceUID: (f"{other.SOPInstanceUID}.dcm", 1)}
    assert node.study(row["study_uid"])["instance_count"] == 2


def test_same_sop_instance_uid_in_another_study_or_series_is_refused_and_the_first_stays(node, tmp_path):
    paths = write_ct_series(tmp_path / "ct", finding="none", slices=2, seed=7304)
    study, series = header(paths[0]).StudyInstanceUID, header(paths[0]).SeriesInstanceUID
    send(node, paths)
    first = wait(node, study, lambda s: s["state"] == "not analysed", "the study not analysed")
    rows = db_rows(node, series)
    files = {p: p.read_bytes() for p in spool_files(node, study, series)}

    elsewhere = pydicom.dcmread(paths[0])
    elsewhere.StudyInstanceUID, elsewhere.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7304", \
        "1.2.826.0.1.3680043.8.498.7304.1"
    other_series = pydicom.dcmread(paths[1])
    other_series.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7304.2"
    assert store(node, [elsewhere, other_series]) == [0xA900, 0xA900]
    log = node.log_tail(200)
    assert f"instance {elsewhere.SOPInstanceUID} refused (0xA900)" in log
    assert f"is stored in study {study} series {series}" in log
    assert "Secret" not in log and str(elsewhere.PatientName) not in log

    def untouched() -> None:
        assert db_rows(node, series) == rows
        assert {p: p.read_bytes() for p in spool_files(node, study, series)} == files
        detail = node.study(study)
        assert (detail["instance_count"], detail["series_count"]) == (2, 1)
        assert [j["run"] for j in detail["jobs"]] == [j["run"] for j in first["jobs"]]
        assert node.study(elsewhere.StudyInstanceUID) is None

    untouched()
    # A file of the same SOP Instance UID under another study in the spool (as older versions
    # of the node left them): a restart neither moves the row nor indexes the file.
    node.stop()
    leftover = node.var / "spool" / elsewhere.StudyInstanceUID / elsewhere.SeriesInstanceUID
    leftover.mkdir(parents=True)
    elsewhere.save_as(leftover / f"{elsewhere.SOPInstanceUID}.dcm", enforce_file_format=True)
    node.start()
    untouched()
    assert "left in place" in node.log_tail(400)
    shutil.rmtree(leftover.parent)
