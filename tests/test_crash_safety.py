"""Crash safety: kill -9 the node while it receives, while a job runs and while a result waits
in the outbox; after each restart every acknowledged instance is in the spool and the state DB,
no partial file counts as an instance, the job resumes, and the PACS holds exactly one result.

One node serves the three kills in sequence (each node start costs ~12 s on our machines).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, free_port, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SLICES = 120
KILL_AFTER_ACKS = 40


class RecordingSender(threading.Thread):
    """A pynetdicom SCU that sends a series in one association and records every status.

    After `kill_after` acknowledgements it starts `kill` in another thread and goes on sending,
    so the node dies while instances are on the wire.
    """

    def __init__(self, port: int, paths: list[Path], kill_after: int, kill):
        super().__init__(name="recording-sender", daemon=True)
        self.port = port
        self.kill_after = kill_after
        self.killer = threading.Thread(target=kill, name="killer", daemon=True)
        self.datasets = [pydicom.dcmread(p) for p in paths]
        self.acknowledged: list[str] = []
        self.error = ""

    def run(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title="BEFUND")
        if not assoc.is_established:
            self.error = "association refused"
            return
        try:
            for ds in self.datasets:
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0x0000:
                    self.error = f"no success for {ds.SOPInstanceUID}: {status}"
                    return
                self.acknowledged.append(str(ds.SOPInstanceUID))
                if len(self.acknowledged) == self.kill_after:
                    self.killer.start()
        except Exception as exc:  # noqa: BLE001 - the node was killed under us: that is the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()


def db_instances(node: RunningNode, series_uid: str) -> dict[str, str]:
    db = sqlite3.connect(f"file:{node.var / 'state.sqlite'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instances WHERE series_uid=?",
                               (series_uid,)).fetchall())
    finally:
        db.close()


def assert_spool_holds_complete_instances(node: RunningNode, study_uid: str, series_uid: str,
                                          acknowledged: list[str]) -> None:
    indexed = db_instances(node, series_uid)
    assert set(acknowledged) <= set(indexed), "an acknowledged instance is missing from the DB"
    files = sorted((node.var / "spool" / study_uid / series_uid).iterdir())
    assert {f.name for f in files} == {f"{uid}.dcm" for uid in indexed}, "spool and DB disagree"
    for f in files:  # every file is whole: it parses and its pixel data is complete
        ds = pydicom.dcmread(f)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8, f.name
    # only the empty files the listener prepares ahead (service/incoming_files.py), no partial data
    assert [f.name for f in (node.var / "spool" / ".incoming").iterdir() if f.stat().st_size] == []
    assert list((node.var / "spool").glob("*/*/.*.tmp")) == []
    assert node.study(study_uid)["instance_count"] == len(indexed)


def test_killed_node_keeps_acknowledged_instances_and_delivers_each_result_once(tmp_path):
    paths = write_ct_series(tmp_path / "ct", finding="subdural", slices=SLICES, seed=9601)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study_uid, series_uid = header.StudyInstanceUID, header.SeriesInstanceUID
    pacs_port = free_port()  # the PACS stays down until the last restart
    node = RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs_port}", quiet_s=600.0)
    node.start()
    try:
        # (a) kill -9 mid-association.
        sender = RecordingSender(node.dicom_port, paths, KILL_AFTER_ACKS, node.kill)
        sender.start()
        sender.join(60)
        sender.killer.join(30)
        acknowledged = list(sender.acknowledged)
        assert KILL_AFTER_ACKS <= len(acknowledged) < SLICES, (len(acknowledged), sender.error)
        node.start()
        assert_spool_holds_complete_instances(node, study_uid, series_uid, acknowledged)

        # (b) The modality sends the series again (duplicates count once); kill -9 mid-job.
        sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
        assert sent.returncode == 0, sent.output
        node.wait_study_state(study_uid, {"running"}, timeout=60)
        node.kill()
        node.start()
        assert node.study(study_uid)["instance_count"] == SLICES

        # (c) The job resumes and finishes; its result waits in the outbox (PACS down): kill -9.
        poll(lambda: any(d["attempts"] >= 1 for d in node.study(study_uid)["deliveries"]),
             120, 0.2, "the result waiting in the outbox")
        node.kill()
        node.start()
        with StoreSCP(tmp_path / "pacs", ae="PACS", port=pacs_port, extra_args=PACS_ARGS) as pacs:
            study = node.wait_study_state(study_uid, {"delivered"}, timeout=60)
            # One run, unless a crash-recovered partial series was completed on its own (then
            # the re-sent instances start run 2): either way one SR per run, each sent once.
            jobs = study["jobs"]
            assert jobs[-1]["run"] == len(jobs) and all(j["state"] == "done" for j in jobs)
            assert jobs[-1]["present"] is not None  # analysed, not "not analysed"
            assert any(j["attempts"] >= 2 for j in jobs), "the killed job was not resumed"
            dicom = [d for d in study["deliveries"] if d["kind"] == "dicom"]
            assert len(dicom) == len(jobs) and all(d["state"] == "delivered" for d in dicom)
            assert any(d["attempts"] >= 2 for d in dicom)
            srs = sr_files(pacs.directory, study_uid)
            # +uf: a result received twice would lie there as a second file.
            assert len(srs) == len({uid for _, _, uid in srs}) == len(jobs), srs
    finally:
        node.stop()
