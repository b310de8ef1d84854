"""Every process the node starts ends with the process that started it, and its var dir is private.

One real node (`befund serve`) receives and analyses a head CT, so that every kind of process
it runs exists (BentoML's arbiter, the gateway and model-service workers, the model service's
decode workers and multiprocessing's resource tracker). Then:

- the var dir, which holds patient data (state DB, spool, results), is readable by the node's
  user only: files 0600 or stricter, directories 0700 or stricter;
- `kill -9` of the top process (what an OOM kill or an operator does) leaves no process of the
  node behind within 10 s: none from the process tree taken before the kill, and none that
  carries the node's var dir in its environment.

The demo's chain (service/demo.py: Orthanc and `befund serve` started by one Python process)
is checked the same way: kill -9 the starter, and Orthanc, the node and its workers end.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from service.orthanc_launcher import ORTHANC
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import PROJECT, REFERENCE_MODELS, RunningNode, poll

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

GONE_WITHIN_S = 10.0


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...], None if the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): the same pid number later belongs to another process if this differs."""
    fields = _stat_fields(pid)
    return (pid, fields[19]) if fields else None


def _alive(identity: tuple[int, str]) -> bool:
    fields = _stat_fields(identity[0])
    return fields is not None and fields[0] != "Z" and fields[19] == identity[1]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(root: int) -> list[tuple[int, str]]:
    """The process tree under `root` (root included), as identities."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        ident = _identity(pid)
        if ident:
            out.append(ident)
        todo.extend(children.get(pid, []))
    return out


def carrying(marker: bytes) -> list[int]:
    """Live processes whose environment or command line holds `marker` (a unique path)."""
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        fields = _stat_fields(pid)
        if not fields or fields[0] == "Z":
            continue
        try:
            blob = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in blob:
            found.append(pid)
    return found


def describe(pids) -> str:
    lines = []
    for pid in pids:
        pid = pid[0] if isinstance(pid, tuple) else pid
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd}")
    return "\n".join(lines)


def assert_all_end(tree: list[tuple[int, str]], marker: bytes) -> None:
    def none_left() -> bool:
        return not [i for i in tree if _alive(i)] and not carrying(marker)

    try:
        poll(none_left, GONE_WITHIN_S, 0.1, "every process of the node ended")
    except TimeoutError:
        left = [i for i in tree if _alive(i)]
        others = carrying(marker)
        for ident in left:  # do not leave them for the next test
            os.kill(ident[0], signal.SIGKILL)
        for pid in others:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"left running {GONE_WITHIN_S:.0f} s after kill -9 of the top "
                             f"process:\n{describe(left + others)}") from None


@pytest.fixture(scope="module")
def analysed_node(tmp_path_factory, pacs):
    """A node that received and analysed one head CT (decode workers have run)."""
    work = tmp_path_factory.mktemp("lifetime")
    paths = write_ct_series(work / "ct", finding="none", slices=16, seed=7101)
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    node = RunningNode(work / "node", pacs=f"PACS@127.0.0.1:{pacs.port}")
    node.start()
    try:
        sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
        assert sent.returncode == 0, sent.output
        study = node.wait_study_state(study_uid, {"delivered"}, timeout=180)
        assert study["present"] is not None
        yield node
    finally:
        node.stop()


def test_var_dir_holding_patient_data_is_private_to_the_node_user(analysed_node):
    var = analysed_node.var
    entries = [var, *var.rglob("*")]
    kinds = {"db": var / "state.sqlite", "spool": var / "spool", "results": var / "results"}
    for name, path in kinds.items():
        assert path.exists(), f"{name} missing: the node did not write what this test checks"
    assert any(p.suffix == ".dcm" for p in (var / "spool").rglob("*")), "no spooled instance"
    assert any(p.suffix == ".dcm" for p in (var / "results").rglob("*")), "no result file"
    loose = [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.relative_to(var.parent)}"
             for p in entries if stat.S_IMODE(p.lstat().st_mode) & 0o077]
    assert loose == [], "readable by group or others:\n" + "\n".join(loose)


def test_kill_9_of_the_top_process_leaves_no_process_of_the_node(analysed_node):
    node = analysed_node
    top = node.proc.pid
    tree = descendants(top)
    marker = str(node.var.resolve()).encode()
    assert len(tree) >= 5, f"expected arbiter, two workers and decode workers:\n{describe(tree)}"
    assert set(carrying(marker)) <= {i[0] for i in tree}
    os.kill(top, signal.SIGKILL)
    node.proc.wait(timeout=30)
    assert_all_end(tree, marker)


DEMO_STARTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from service.demo import BefundProcess
    from service.orthanc_launcher import Orthanc, free_port
    work = Path(sys.argv[1])
    dicom, http = free_port(), free_port()
    config = {"ae_title": "BEFUND", "dicom_host": "127.0.0.1", "dicom_port": dicom,
              "http_port": http, "var_dir": str(work / "var"), "token": "t" * 32,
              "models_dir": sys.argv[2], "settle_s": 1.0}
    with Orthanc("BEFUND", dicom, lua=False) as pacs:
        befund = BefundProcess(work, config)
        befund.start()
        print("ready", pacs.proc.pid, befund.proc.pid, flush=True)
        time.sleep(600)  # until the test kills this process
""")


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc is not installed")
def test_kill_9_of_the_demo_ends_orthanc_and_the_node(tmp_path):
    models = os.environ.get("BEFUND_TEST_MODELS_DIR", str(REFERENCE_MODELS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
    starter = subprocess.Popen([sys.executable, "-c", DEMO_STARTER, str(tmp_path), models],
                               cwd=PROJECT, env=env, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        line = starter.stdout.readline()  # the starter's deadlines bound this read
        assert line.startswith("ready"), f"demo starter did not start: {line!r}"
        tree = descendants(starter.pid)
        names = describe(tree)
        assert "Orthanc" in names and "bentoml" in names, names
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(timeout=30)
        assert_all_end(tree, str((tmp_path / "var").resolve()).encode())
    finally:
        if starter.poll() is None:
            os.killpg(starter.pid, signal.SIGKILL)
            starter.wait(timeout=30)
        starter.stdout.close()


def test_a_var_dir_left_open_by_an_older_node_keeps_working_and_is_closed(tmp_path):
    from service.config import Config
    from service.node import Node
    from service.state_db import StateDB

    var = tmp_path / "var"
    old_umask = os.umask(0o022)  # what an older node created
    try:
        (var / "spool").mkdir(parents=True)
        StateDB(var / "state.sqlite").close()
        (var / "token").write_text("an-older-token-of-32-characters-x\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(var.stat().st_mode) == 0o755
    node = Node(Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(var), min_free_bytes=0,
                       models_dir=str(REFERENCE_MODELS)))
    try:
        node.start_receiving()
        assert node.token == "an-older-token-of-32-characters-x"
        assert node.db.job_counts() == {}
        for path in (var, var / "spool", var / "state.sqlite", var / "token"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))
    finally:
        node.stop()
