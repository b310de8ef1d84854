"""Real DICOM peers for tests and benchmarks: DCMTK storescu / echoscu / storescp subprocesses.

Nothing here sleeps to synchronise: StoreSCP waits until its port accepts a connection,
with a deadline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have_dcmtk() -> bool:
    return all(shutil.which(tool) for tool in ("storescu", "echoscu", "storescp"))


def _env_nodelay() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class PeerResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_storescu(files: Sequence[os.PathLike | str], ae: str = "STORESCU", host: str = "127.0.0.1",
                 port: int = 11112, extra_args: Sequence[str] = (), called_ae: str = "BEFUND",
                 timeout: float = DEFAULT_TIMEOUT_S, check: bool = False) -> PeerResult:
    """Send `files` in one association with DCMTK storescu; `-R` proposes only what they need."""
    cmd = ["storescu", "-aet", ae, "-aec", called_ae, "-R", *extra_args, host, str(port),
           *[str(f) for f in files]]
    return _run(cmd, timeout, check)


def run_echoscu(ae: str = "ECHOSCU", host: str = "127.0.0.1", port: int = 11112,
                extra_args: Sequence[str] = (), called_ae: str = "BEFUND",
                timeout: float = DEFAULT_TIMEOUT_S, check: bool = False) -> PeerResult:
    cmd = ["echoscu", "-aet", ae, "-aec", called_ae, *extra_args, host, str(port)]
    return _run(cmd, timeout, check)


def _run(cmd: list[str], timeout: float, check: bool) -> PeerResult:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env_nodelay())
    result = PeerResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {result.output[-2000:]}")
    return result


def wait_for_port(host: str, port: int, deadline_s: float = 10.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Block until `host:port` accepts TCP connections, or raise after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # poll interval while waiting on a deadline, not a synchronisation sleep
    raise TimeoutError(f"nothing listening on {host}:{port} after {deadline_s} s")


class StoreSCP:
    """DCMTK storescp writing into `directory`, as a context manager.

    `with StoreSCP(tmp_path) as scp: run_storescu(files, port=scp.port, called_ae=scp.ae)`
    Default arguments are the benchmark's: bit-preserving, max PDU 128 KiB, TCP_NODELAY.
    """

    def __init__(self, directory: os.PathLike | str, ae: str = "STORESCP", port: int | None = None,
                 host: str = "127.0.0.1",
                 extra_args: Sequence[str] = ("--max-pdu", "131072", "+B")):
        self.directory = Path(directory)
        self.ae = ae
        self.host = host
        self.chosen_port = port is None  # ours to change if another process takes it first
        self.port = port or free_port(host)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            cmd = ["storescp", "-aet", self.ae, "-od", str(self.directory), *self.extra_args,
                   str(self.port)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=_env_nodelay())
            try:
                wait_for_port(self.host, self.port, proc=self.proc)
                return self
            except RuntimeError:
                # a free port is free only a moment: with test files in parallel, another
                # process can bind it first; storescp then exits at once and we take another
                self.__exit__()
                if not self.chosen_port or attempt == 2:
                    raise
                self.port = free_port(self.host)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
