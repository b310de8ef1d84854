"""Roles and remote model services: `befund serve --role receiver`, `--role worker` and two
`--role models` replicas on one PostgreSQL and one spool, a DCMTK storescp as the PACS.

The receiver takes the study, the worker completes and analyses it on a remote model
service, the replica that holds the call is killed with -9 in the middle of it, and the
worker sends the series to the other replica: the study is still delivered, one SR.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

DELAY_S = 60.0  # replica A's analysis waits this long (test hook): time to kill it mid-call


class ModelHost(RunningNode):
    """`befund serve --role models`: HTTP only, no DICOM port to wait for."""

    def _answers(self, probe: str) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"model host exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}{probe}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


class WorkerNode(RunningNode):
    """`--role worker`: no DICOM port either."""

    _answers = ModelHost._answers


def start_together(*nodes: RunningNode) -> None:
    """Start the nodes at once (each waits for its own readiness); raise the first failure."""
    errors: list[BaseException] = []

    def start(node: RunningNode) -> None:
        try:
            node.start(timeout=180)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for node in nodes:
            node.stop()
        raise errors[0]


@pytest.fixture
def pacs(tmp_path):
    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=PACS_ARGS) as scp:
        yield scp


def test_a_model_replica_killed_mid_study_does_not_fail_the_study(tmp_path, pg_server, pacs):
    url = pg_server.new_database()
    shared = {"spool_dir": str(tmp_path / "spool"), "results_dir": str(tmp_path / "results")}
    a = ModelHost(tmp_path / "models-a", role="models", fault_delays={"analysis": DELAY_S},
                  env={"BEFUND_TESTING": "1"}, **shared)
    b = ModelHost(tmp_path / "models-b", role="models", **shared)
    receiver = RunningNode(tmp_path / "receiver", role="receiver", database_url=url,
                           instance_id="receiver", **shared)
    worker = WorkerNode(tmp_path / "worker", role="worker", database_url=url, instance_id="worker",
                        pacs=f"{pacs.ae}@127.0.0.1:{pacs.port}", model_services=[a.url, b.url], **shared)
    start_together(a, b, receiver, worker)
    with a, b:
        with receiver, worker:
            checks = {c["name"] for c in receiver.api("/status")[1]["checks"]}
            assert checks == {"dicom", "spool", "state_db"}
            checks = {c["name"] for c in worker.api("/status")[1]["checks"]}
            assert "dicom" not in checks and {"jobs", "delivery", "completion"} <= checks

            paths = write_ct_series(tmp_path / "ct", finding="none", slices=16, seed=7401)
            study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            sent = run_storescu(paths, ae="MODALITY", port=receiver.dicom_port, timeout=120)
            assert sent.returncode == 0, sent.output
            # the first call goes to the first of two idle replicas: a, which waits DELAY_S
            poll(lambda: "waits" in a.log_tail(200), 120, 0.2, "the analysis at replica a")
            a.kill()
            done = worker.wait_study_state(study, {"delivered"}, timeout=120)
            assert receiver.study(study)["state"] == "delivered"  # any instance answers for all
            [job] = done["jobs"]
            assert job["state"] == "done" and job["attempts"] <= 1, job
            assert "failed a call" in worker.log_tail(400)
            assert "waits" not in b.log_tail(400)  # b analysed it at once
            assert len(poll(lambda: sr_files(pacs.directory, study), 30, what="the SR")) == 1
            with urllib.request.urlopen(f"{b.url}/livez", timeout=5) as r:  # the liveness probe
                assert r.status == 200

