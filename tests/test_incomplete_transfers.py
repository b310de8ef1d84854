"""Incomplete data never counts, and never lingers: against the running node, over real sockets.

- A transfer cut in the middle of its data set leaves a partial file in the node's incoming
  folder only while its association lasts: it is removed when the association ends, however
  it ends (release, abort, a closed socket, silence until the network timeout, a killed peer).
- An instance whose pixel data are shorter than its header declares is refused at receive
  (0xC000, the reason in the log), never acknowledged and found broken later.
- A full disk: an instance that would take the disk past the `min_free_bytes` watermark is
  answered 0xA700 while it arrives, the disk never goes past the watermark, and the same
  association goes on; ENOSPC while receiving is the same 0xA700, never an A-ABORT. (Needs a
  small filesystem: a tmpfs mounted as the node's var dir, so root; skipped otherwise. ENOSPC
  itself is reached with the node's listener in this process, its free-space reading made to
  lie: the real node's watermark check never lets a write reach a full disk.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config

from service.spool import Spool
from tests.dicom_peers import have_dcmtk, run_storescu
from tests.node_harness import PROJECT, RunningNode, poll
from tests.partial_store import A_RELEASE_RQ, start_partial_store
from tests.test_dicom_listener import make_ct

pytestmark = [pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

NETWORK_TIMEOUT_S = 4.0
READY_FILES = 4  # empty files the listener keeps prepared (service/incoming_files.py)
ENDINGS = ["release", "abort", "closed socket", "silence until the network timeout", "killed peer"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with RunningNode(tmp_path_factory.mktemp("node"), network_timeout_s=NETWORK_TIMEOUT_S) as n:
        yield n


def incoming_files(node: RunningNode) -> dict[str, int]:
    """Name -> size of each file in the node's incoming folder."""
    out = {}
    for path in (node.var / "spool" / ".incoming").iterdir():
        with contextlib.suppress(FileNotFoundError):  # stored or removed while we look
            out[path.name] = path.stat().st_size
    return out


def partial_files(node: RunningNode) -> list[str]:
    return [name for name, size in incoming_files(node).items() if size]


def end_association(assoc, how: str) -> None:
    sock = assoc.dul.socket.socket
    if how == "release":  # an A-RELEASE-RQ in the middle of the data set
        sock.sendall(A_RELEASE_RQ)
    elif how == "abort":
        assoc.abort()
    elif how == "closed socket":
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    # "silence until the network timeout": nothing; the node drops it


@pytest.mark.parametrize("ending", ENDINGS)
def test_partial_file_is_removed_when_its_association_ends(node, tmp_path, ending):
    peer = assoc = None
    if ending == "killed peer":
        peer = subprocess.Popen([sys.executable, "-m", "tests.partial_store", str(node.dicom_port)],
                                cwd=PROJECT, stdout=subprocess.PIPE)
        assert peer.stdout.readline().strip() == b"sent"
    else:
        ds = dcmread(make_ct(tmp_path / "big.dcm", rows=512, cols=512, seed=ENDINGS.index(ending)))
        assoc = start_partial_store(node.dicom_port, ds)
    try:
        # half a data set has arrived: its partial file is there while the association lasts
        poll(lambda: partial_files(node), 30, 0.05, "the partial file in the incoming folder")
        if peer is not None:
            peer.kill()
            peer.wait(30)
        else:
            end_association(assoc, ending)
        poll(lambda: not partial_files(node), NETWORK_TIMEOUT_S + 30, 0.1,
             f"the partial file removed after the association's {ending}")
        # no file left behind: the folder settles to the prepared ones (and one on its way; the
        # refill of the pool may be mid-way on a busy machine)
        poll(lambda: len(incoming_files(node)) <= READY_FILES + 1, 30, 0.1,
             f"the incoming folder back to {READY_FILES} prepared files")
    finally:
        if assoc is not None and assoc.is_established:
            assoc.abort()
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait(30)
        if peer is not None:
            peer.stdout.close()
    good = run_storescu([make_ct(tmp_path / "good.dcm")], ae="MODALITY", port=node.dicom_port)
    assert good.returncode == 0, good.output


# --- pixel data shorter than declared ---------------------------------------------------------

def _short_native(tmp: Path) -> tuple[Path, str]:
    ds = dcmread(make_ct(tmp / "short.dcm", rows=128, cols=128))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(tmp / "short.dcm", enforce_file_format=True)
    return tmp / "short.dcm", "the pixel data hold 10922 bytes, 128x128"


def _cut_in_pixel_data(tmp: Path) -> tuple[Path, str]:
    path = make_ct(tmp / "cut.dcm", rows=128, cols=128)
    path.write_bytes(path.read_bytes()[:-5000])  # the element says 5000 bytes more than there are
    return path, "the pixel data element declares 32768 bytes, the file holds 27768"


def _rle(tmp: Path, name: str, frames: int = 3) -> Dataset:
    ds = dcmread(make_ct(tmp / name, rows=64, cols=64, frames=frames))
    ds.compress(RLELossless)
    return ds


def _fewer_fragments_than_frames(tmp: Path) -> tuple[Path, str]:
    ds = _rle(tmp, "frames.dcm")
    ds.NumberOfFrames = 5
    ds.save_as(tmp / "frames.dcm", enforce_file_format=True)
    return tmp / "frames.dcm", "5 frame(s) declared, the encapsulated pixel data hold 3 fragment(s)"


def _fragment_cut(tmp: Path) -> tuple[Path, str]:
    ds = _rle(tmp, "fragment.dcm")
    ds.save_as(tmp / "fragment.dcm", enforce_file_format=True)
    raw = (tmp / "fragment.dcm").read_bytes()
    (tmp / "fragment.dcm").write_bytes(raw[:-300])  # into the last fragment, no delimiter
    return tmp / "fragment.dcm", "fragment 3 of the encapsulated pixel data declares"


SHORT = {"native pixel data a third of Rows x Columns x 16 bits": _short_native,
         "the file ends inside the pixel data element": _cut_in_pixel_data,
         "fewer fragments than frames": _fewer_fragments_than_frames,
         "the file ends inside a fragment": _fragment_cut}


def send_file_as_is(port: int, path: Path) -> int:
    """Send a Part 10 file's data set bytes exactly as they are (pynetdicom does not parse them)."""
    ds = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND")
    assert assoc.is_established
    try:
        _config.STORE_SEND_CHUNKED_DATASET = True
        return int(assoc.send_c_store(path).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("case", list(SHORT))
def test_instance_with_pixel_data_shorter_than_declared_is_refused_at_receive(node, tmp_path, case):
    path, reason = SHORT[case](tmp_path)
    study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    assert send_file_as_is(node.dicom_port, path) == 0xC000
    poll(lambda: reason in node.log_path.read_text(errors="replace"), 30, 0.1, f"{reason!r} in the log")
    assert node.study(study) is None  # nothing acknowledged, nothing counted
    assert not (node.var / "spool" / study).exists()


def test_the_same_instances_with_whole_pixel_data_are_stored(node, tmp_path):
    """The control: whole native and RLE instances pass the same check."""
    native = make_ct(tmp_path / "whole.dcm", rows=128, cols=128)
    rle = _rle(tmp_path, "rle.dcm")
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    for path in (native, tmp_path / "rle.dcm"):
        assert send_file_as_is(node.dicom_port, path) == 0x0000
        assert node.study(dcmread(path, stop_before_pixels=True).StudyInstanceUID) is not None


# --- a full disk -------------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(where: Path, size_mb: int):
    """A tmpfs of `size_mb` at `where` (root only: skips the test otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def leave_free(where: Path, ballast: Path, free: int) -> None:
    """Grow or shrink `ballast` until about `free` bytes are left on the filesystem of `where`."""
    size = ballast.stat().st_size if ballast.exists() else 0
    target = max(0, size + free_bytes(where) - free)
    with open(ballast, "ab") as f:
        f.truncate(target)
        if target > size:  # tmpfs allocates on write, not on truncate
            f.seek(size)
            left = target - size
            while left:
                n = f.write(b"\0" * min(left, MB))
                left -= n


class FreeSpaceWatch(threading.Thread):
    """Samples the free bytes of a filesystem every few ms; `lowest` is the least it saw."""

    def __init__(self, where: Path):
        super().__init__(daemon=True)
        self.where = where
        self.lowest = free_bytes(where)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.lowest = min(self.lowest, free_bytes(self.where))


def store_one_by_one(port: int, datasets: list[Dataset], between=None) -> list[int]:
    """C-STORE each data set over one association; `between(i)` runs after the i-th answer.
    A status of -1 means the association was gone (an A-ABORT)."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND")
    assert assoc.is_established
    statuses = []
    try:
        for i, ds in enumerate(datasets):
            status = assoc.send_c_store(ds) if assoc.is_established else None
            statuses.append(int(status.Status) if status is not None and "Status" in status else -1)
            if between:
                between(i)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def test_a_full_disk_answers_out_of_resources_and_never_fills_past_the_watermark(tmp_path):
    workdir = tmp_path / "node"
    with small_filesystem(workdir / "var", 48) as var:
        big = dcmread(make_ct(tmp_path / "big.dcm", rows=512, cols=512, frames=36))  # 18 MiB
        small = [dcmread(make_ct(tmp_path / f"small{i}.dcm", rows=64, cols=64, seed=i)) for i in range(3)]
        ballast = var / "ballast"
        watermark = 4 * MB
        node = RunningNode(workdir, min_free_bytes=watermark)
        with node:
            # The watermark: 8 MiB free, 4 MiB kept: the 18 MiB instance stops at the watermark.
            leave_free(var, ballast, 8 * MB)
            watch = FreeSpaceWatch(var)
            watch.start()

            def between(i: int) -> None:
                if i == 0:
                    watch.done.set()
                elif i == 1:
                    leave_free(var, ballast, watermark // 2)  # below the watermark now
                elif i == 2:
                    leave_free(var, ballast, 8 * MB)  # space freed again

            statuses = store_one_by_one(node.dicom_port, [big, small[0], small[1], small[2]], between)
            assert statuses == [0xA700, 0x0000, 0xA700, 0x0000], [hex(s) for s in statuses]
            assert watch.lowest >= watermark - 256 * 1024, f"free disk fell to {watch.lowest} bytes"
            assert "would fall below the watermark" in node.log_path.read_text(errors="replace")
            poll(lambda: not partial_files(node), 30, 0.1, "no partial file left")
            stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID
                      for p in (var / "spool").glob("*/*/*.dcm")}
            assert stored == {small[0].SOPInstanceUID, small[2].SOPInstanceUID}


def test_enospc_while_receiving_answers_out_of_resources_and_the_association_goes_on(tmp_path,
                                                                                   monkeypatch):
    """ENOSPC itself: the node's listener on a 20 MiB tmpfs whose free-space reading is made to
    lie (so the watermark check lets the write through to the full disk)."""
    from service.config import Config
    from service.dicom_listener import DicomListener
    from service.incoming_files import SpaceGuard
    from tests.test_dicom_listener import Recorder

    with small_filesystem(tmp_path / "var", 20) as var:
        big = dcmread(make_ct(tmp_path / "big.dcm", rows=512, cols=512, frames=36))  # 18 MiB
        small = dcmread(make_ct(tmp_path / "small.dcm", rows=64, cols=64))
        leave_free(var, var / "ballast", 8 * MB)
        monkeypatch.setattr(SpaceGuard, "free_bytes", lambda self: 1 << 40)
        cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(var), min_free_bytes=MB)
        recorder = Recorder()
        spool = Spool(cfg.spool_path, 0)  # the spool's own check after the transfer: off too
        listener = DicomListener(cfg, spool, recorder.on_instance, recorder.on_association_end)
        log = LogLines()
        logging.getLogger("befund").addHandler(log)
        listener.start()
        try:
            statuses = store_one_by_one(listener.port, [big, small, big, small])
        finally:
            listener.stop()
            logging.getLogger("befund").removeHandler(log)
        assert statuses == [0xA700, 0x0000, 0xA700, 0x0000], [hex(s) for s in statuses]
        assert "No space left on device" in log.text and "refused (0xA700)" in log.text
        assert [i.sop_instance_uid for i in recorder.instances] == [small.SOPInstanceUID]
        assert [p.name for p in spool.incoming.iterdir() if p.stat().st_size] == []
        assert free_bytes(var) > 7 * MB  # the partial file's space is back


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
