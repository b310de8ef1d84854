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


def test_postgresql_stopped_for_20_s_refuses_instances_and_everything_resumes(tmp_path, pacs):
    """While the state DB is gone: /readyz fails and /status names state_db, a C-STORE is
    answered 0xA700 and leaves no file; when it is back, the node carries on by itself (the
    job that was running when it went finishes, new studies are analysed and delivered)."""
    from tests.pg_server import PgServer

    first, study1, _ = ct_study(tmp_path / "ct1", 8301)
    second, study2, _ = ct_study(tmp_path / "ct2", 8302)
    lost = pydicom.dcmread(ct_study(tmp_path / "ct3", 8303, slices=1)[0][0])
    with PgServer() as pg:
        url = pg.new_database()
        node = shared_node(tmp_path, "node-a", url, tmp_path / "shared", pacs,
                           fault_delays={"analysis": 4}, database_timeout_s=3.0)
        with node:
            sent = run_storescu(first, ae="MODALITY", port=node.dicom_port, timeout=120)
            assert sent.returncode == 0, sent.output
            node.wait_study_state(study1, {"running"}, timeout=90)
            pg.stop()
            stopped = time.monotonic()
            poll(lambda: _not_ready_naming_state_db(node), 30, 0.5, "/readyz failing on state_db")
            assert _store(node.dicom_port, lost) == 0xA700
            assert not list((tmp_path / "shared" / "spool").glob(f"*/*/{lost.SOPInstanceUID}*"))
            poll(lambda: time.monotonic() - stopped >= 20, 25, 0.5, "20 s without PostgreSQL")
            assert node.proc.poll() is None
            pg.start()
            poll(lambda: node.api("/readyz", token=None)[0] == 200, 90, 0.5, "ready again")
            assert _store(node.dicom_port, lost) == 0x0000
            sent = run_storescu(second, ae="MODALITY", port=node.dicom_port, timeout=120)
            assert sent.returncode == 0, sent.output
            for study in (study1, study2):
                node.wait_study_state(study, {"delivered"}, timeout=180)
            for study in (study1, study2):  # one SR each (+uf: a second one would be a file)
                assert len(poll(lambda s=study: sr_files(pacs.directory, s), 60, 0.2, "its SR")) == 1
            assert node.api("/livez", token=None)[0] == 200


def _not_ready_naming_state_db(node: RunningNode) -> bool:
    code, _ = node.api("/readyz", token=None)
    status, body = node.api("/status")
    if code == 200 or status != 503:
        return False
    failing = {c["name"]: c["detail"] for c in body["checks"] if not c["ok"]}
    return "state_db" in failing and "PostgreSQL" in failing["state_db"]


def _store(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
