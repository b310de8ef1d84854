"""The outbox delivers to a real DCMTK storescp, backs off while it is down, and dead-letters."""

import random
import time
from dataclasses import replace

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.config import Config, DeliveryConfig, Destination
from service.outbox import Outbox, backoff_delay
from service.state_db import StateDB
from tests.dicom_peers import StoreSCP, free_port, have_dcmtk
from tests.node_harness import poll

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")


def test_backoff_grows_exponentially_with_jitter_and_caps():
    rng = random.Random(1)
    delays = [backoff_delay(n, 1.0, 60.0, rng) for n in range(1, 10)]
    assert 0.5 <= delays[0] <= 1.5 and 2 <= delays[2] <= 6
    assert all(d <= 90.0 for d in delays)
    assert len({round(d, 3) for d in delays}) == len(delays)  # jitter: no two alike


def sc_file(tmp_path):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "OUTBOX^TEST"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "result.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds.SOPInstanceUID


def queue_one(db, path):
    with db.transaction() as tx:
        tx.execute("""INSERT INTO jobs(series_uid, study_uid, model_name, model_version, run,
                      instance_count, created_at, updated_at) VALUES ('1.2','1','m','1',1,1,0,0)""")
    job_id = db.query_one("SELECT id FROM jobs")["id"]
    db.finish_job(job_id, "done", {}, "", [("dicom", "pacs", {"files": [str(path)]})])
    return db.due_deliveries(time.time())[0]


def make_outbox(tmp_path, target, port, **delivery):
    cfg = Config(var_dir=str(tmp_path / "var"),
                 destinations=(Destination("STORESCP", "127.0.0.1", port),),
                 delivery=replace(DeliveryConfig(), **delivery))
    db = StateDB(target)
    return db, Outbox(db, cfg, rng=random.Random(0))


def test_delivery_waits_out_an_outage_then_lands_once(tmp_path, state_db_target):
    path, sop = sc_file(tmp_path)
    port = free_port()
    db, outbox = make_outbox(tmp_path, state_db_target, port, initial_backoff_s=0.2, max_backoff_s=0.5)
    row = queue_one(db, path)
    assert outbox.attempt(row) is False  # PACS down
    failed = db.delivery(row.id)
    assert failed.state == "pending" and failed.attempts == 1
    assert "cannot connect" in failed.last_error or "refused" in failed.last_error
    assert failed.next_attempt_at > time.time()
    with StoreSCP(tmp_path / "pacs", port=port) as scp:
        outbox.start()
        try:
            poll(lambda: db.delivery(row.id).state == "delivered", 20, what="delivery")
        finally:
            outbox.stop()
        received = list((tmp_path / "pacs").iterdir())
        assert len(received) == 1 and sop in received[0].name
        assert scp.proc.poll() is None


def test_old_failures_go_to_dead_letter_and_can_be_resent(tmp_path, state_db_target):
    path, _ = sc_file(tmp_path)
    port = free_port()
    db, outbox = make_outbox(tmp_path, state_db_target, port, dead_letter_after_s=0.0)
    row = queue_one(db, path)
    assert outbox.attempt(row) is False
    assert db.delivery(row.id).state == "dead"
    assert db.due_deliveries(time.time() + 3600) == []
    assert db.resend(row.id)
    with StoreSCP(tmp_path / "pacs", port=port):
        assert outbox.attempt(db.delivery(row.id)) is True
    assert db.delivery(row.id).state == "delivered"
