"""`receive_workers`: several processes of one node take DICOM on one port (SO_REUSEPORT).

One node on PostgreSQL with two receiver processes: both listen on the DICOM port, parallel
associations land on both and every acknowledged instance is indexed once, a receiver killed
with -9 is started again, and when the gateway dies its receivers end with it.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psycopg
import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import RunningNode, descendants, poll

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SLICES = 6


def db_rows(url: str, sql: str) -> list[dict]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(sql).fetchall()


def listening_pids(port: int) -> set[int]:
    """Every process that holds a listening socket on `port` (several with SO_REUSEPORT)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def node(tmp_path_factory, pg_server):
    work = tmp_path_factory.mktemp("receivers")
    url = pg_server.new_database()
    with RunningNode(work / "node", database_url=url, instance_id="rx", receive_workers=2,
                     spool_dir=str(work / "spool"), results_dir=str(work / "results")) as n:
        n.db_url = url
        yield n


def test_two_processes_listen_on_the_dicom_port(node):
    pids = poll(lambda: listening_pids(node.dicom_port) if len(listening_pids(node.dicom_port)) == 2
                else None, 30, what="two listeners")
    gateway = node.gateway_pid()
    assert gateway in pids
    assert pids - {gateway} <= set(descendants(gateway))  # the other one is the gateway's child


def test_parallel_associations_reach_both_processes_and_each_instance_is_indexed_once(node, tmp_path):
    series = []
    for i in range(8):
        paths = write_ct_series(tmp_path / f"ct{i}", finding="none", slices=SLICES, seed=7300 + i)
        series.append((paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)))
    results = {}

    def send(i: int, paths: list[Path]) -> None:
        results[i] = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)

    senders = [threading.Thread(target=send, args=(i, p)) for i, (p, _) in enumerate(series)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(180)
    assert all(r.returncode == 0 for r in results.values()), [r.output for r in results.values()]
    rows = db_rows(node.db_url, "SELECT series_uid, instance_count FROM series")
    counts = {r["series_uid"]: r["instance_count"] for r in rows}
    assert all(counts.get(uid) == SLICES for _, uid in series), counts
    assert db_rows(node.db_url, "SELECT count(*) AS n FROM instances")[0]["n"] == 8 * SLICES
    owners = {r["instance_id"] for r in db_rows(node.db_url, "SELECT DISTINCT instance_id FROM associations")}
    # 8 connections spread by the kernel's hash over 2 processes: all on one has odds 1 in 128
    assert owners == {"rx", "rx-r1"}, owners
    # /metrics sums the counters of every receiver process
    status, text = node.api("/metrics")
    received = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("befund_instances_received_total{"))
    assert received == 8 * SLICES, text[:2000]


def test_a_killed_receiver_is_started_again(node):
    gateway = node.gateway_pid()
    [child] = listening_pids(node.dicom_port) - {gateway}
    os.kill(child, signal.SIGKILL)
    poll(lambda: len(listening_pids(node.dicom_port) - {gateway, child}) == 1, 30,
         what="a new receiver process")
    poll(lambda: node.api("/readyz", token=None)[0] == 200, 30, what="ready again")
    status, body = node.api("/status")
    [dicom] = [c for c in body["checks"] if c["name"] == "dicom"]
    assert dicom["ok"] and "2 process(es)" in dicom["detail"]


def test_receivers_end_when_the_gateway_dies(node):
    gateway = node.gateway_pid()
    children = listening_pids(node.dicom_port) - {gateway}
    assert children
    os.kill(gateway, signal.SIGKILL)
    poll(lambda: not any(Path(f"/proc/{pid}").exists() and "zombie" not in
                         Path(f"/proc/{pid}/status").read_text().lower() for pid in children),
         30, what="the receivers ending with their gateway")
