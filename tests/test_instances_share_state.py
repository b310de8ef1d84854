"""Two befund instances (two `befund serve`, own ports) on one PostgreSQL and one spool, with a
DCMTK storescp as the PACS: a series sent in parts to both is one series and one run; an
instance killed with -9 while it holds leased jobs loses nothing (the other finishes them once
the leases run out, and the PACS holds exactly one SR per run).

The PostgreSQL server is the test session's (tests/pg_server.py); each test has a database,
a spool and a results folder of its own, shared by its two nodes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SLICES = 16
LEASE_S = 8.0


def shared_node(workdir: Path, name: str, url: str, shared: Path, pacs: StoreSCP,
                **overrides) -> RunningNode:
    """A node of the pair: its own var dir and ports, the pair's state DB, spool and results."""
    return RunningNode(workdir / name, pacs=f"{pacs.ae}@127.0.0.1:{pacs.port}", database_url=url,
                       instance_id=name, spool_dir=str(shared / "spool"),
                       results_dir=str(shared / "results"), job_lease_s=LEASE_S,
                       env={"BEFUND_TESTING": "1"}, **overrides)


def db_rows(url: str, sql: str, args: tuple = ()) -> list[dict]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(sql, args).fetchall()


def ct_study(folder: Path, seed: int, slices: int = SLICES) -> tuple[list[Path], str, str]:
    paths = write_ct_series(folder, finding="none", slices=slices, seed=seed)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return paths, str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


@pytest.fixture
def pacs(tmp_path):
    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=PACS_ARGS) as scp:
        yield scp


def test_a_series_sent_in_parts_to_two_instances_is_one_series_and_one_run(tmp_path, pg_server, pacs):
    url = pg_server.new_database()
    paths, study, series = ct_study(tmp_path / "ct", 8101, slices=24)
    with shared_node(tmp_path, "node-a", url, tmp_path / "shared", pacs) as a, \
            shared_node(tmp_path, "node-b", url, tmp_path / "shared", pacs) as b:
        # b's association stays open while a's delivers its part and ends
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", b.dicom_port, ae_title="BEFUND")
        assert assoc.is_established
        try:
            for p in paths[:8]:
                assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
            sent = run_storescu(paths[8:16], ae="MODALITY", port=a.dicom_port, timeout=120)
            assert sent.returncode == 0, sent.output
            # a's association ended; b's is open: the series must not complete (settle_s is 1 s)
            deadline = time.monotonic() + 4 * a.config["settle_s"]
            while time.monotonic() < deadline:
                assert db_rows(url, "SELECT id FROM jobs") == [], "completed while b still receives"
                time.sleep(0.2)  # noqa: TID251 - a window in which nothing may happen, polled
            for p in paths[16:]:
                assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
        finally:
            assoc.release()
        done = a.wait_study_state(study, {"delivered"}, timeout=180)
        assert b.study(study)["state"] == "delivered"  # any instance answers for all
        [job] = done["jobs"]
        assert job["run"] == 1 and job["state"] == "done"
        assert db_rows(url, "SELECT instance_count FROM series") == [{"instance_count": 24}]
        assert db_rows(url, "SELECT instance_count FROM jobs") == [{"instance_count": 24}]
        assert len(poll(lambda: sr_files(pacs.directory, study), 30, what="the SR")) == 1
        assert series in {r["series_uid"] for r in db_rows(url, "SELECT series_uid FROM series")}


def test_an_instance_killed_while_it_holds_jobs_loses_nothing(tmp_path, pg_server, pacs):
    """6 studies split over both instances; a is slow (its analysis waits, test hook) and is
    killed with -9 while it holds leased jobs; b finishes them after the leases run out."""
    url = pg_server.new_database()
    studies = [ct_study(tmp_path / f"ct{i}", 8201 + i) for i in range(6)]
    a = shared_node(tmp_path, "node-a", url, tmp_path / "shared", pacs, job_workers=3,
                    fault_delays={"analysis": 600})
    b = shared_node(tmp_path, "node-b", url, tmp_path / "shared", pacs, job_workers=1)
    with a, b:
        senders = [threading.Thread(target=run_storescu, args=(paths,),
                                    kwargs={"ae": "MODALITY", "port": (a, b)[i % 2].dicom_port,
                                            "timeout": 120, "check": True})
                   for i, (paths, _, _) in enumerate(studies)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(180)
        held = poll(lambda: db_rows(url, """SELECT id FROM jobs WHERE state='running'
                                             AND lease_owner='node-a'"""), 120, 0.2,
                    "node-a holding a leased job")
        a.kill()
        killed_at = time.time()
        for _, study, _ in studies:
            b.wait_study_state(study, {"delivered"}, timeout=240)
        jobs = {j["id"]: j for j in db_rows(url, "SELECT * FROM jobs")}
        assert len(jobs) == 6 and all(j["state"] == "done" for j in jobs.values())
        for row in held:  # taken over by b only after a's lease had run out
            assert jobs[row["id"]]["attempts"] >= 2
            assert jobs[row["id"]]["finished_at"] >= killed_at
        for paths, study, _ in studies:  # every acknowledged instance is there
            assert b.study(study)["instance_count"] == len(paths)
        poll(lambda: len(sr_files(pacs.directory)) >= 6, 60, 0.2, "6 SRs in the PACS")
        srs = sr_files(pacs.directory)
        assert len(srs) == 6 and len({uid for _, _, uid in srs}) == 6  # +uf: twice would be 2 files
        assert {study for _, study, _ in srs} == {s for _, s, _ in studies}
        deliveries = db_rows(url, "SELECT state, attempts FROM outbox WHERE kind='dicom'")
        assert len(deliveries) == 6 and all(d["state"] == "delivered" for d in deliveries)
