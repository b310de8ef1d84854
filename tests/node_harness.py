"""Starts the real node (`befund serve`: BentoML gateway + model service) for end-to-end tests.

Each RunningNode gets its own var dir, free DICOM and HTTP ports and a YAML config; it waits
(poll with a deadline) until the HTTP API answers and the DICOM port accepts a C-ECHO.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from service.model_tools.local_peers import stop_groups
from tests.dicom_peers import free_port

PROJECT = Path(__file__).resolve().parent.parent
# The models a test node runs unless a test names others: the two reference models (links to
# models/ich_ct and models/tumor_wsi), so that the suite's head CTs get one SR each; tests of
# other models (tests/test_ich_seg.py) give their own models_dir.
REFERENCE_MODELS = PROJECT / "tests" / "reference_models"
BEFUND = Path(sys.executable).parent / "befund"
TOKEN = "test-token-not-secret-0123456789abcdef"  # >= 32 characters, as the config demands


def poll(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Return predicate()'s first truthy value, or raise after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)  # poll interval under a deadline, not a synchronisation sleep


def stop_bentoml(proc: subprocess.Popen) -> None:
    """Stop a `bentoml serve` started in its own session: SIGTERM to the arbiter only (it stops
    its workers cleanly; a group-wide SIGTERM leaves the arbiter waiting), then kill the rest."""
    stop_groups([proc], grace_s=30)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RunningNode:
    def __init__(self, workdir: Path, pacs: str | None = None, http_ca: str | None = None,
                 env: dict[str, str] | None = None, **overrides: Any):
        """`overrides` are config keys; with `http_tls={"cert": ..., "key": ...}` the node speaks
        HTTPS and `http_ca` (a CA file) is what the harness trusts. `env` is added on top of the
        test's environment less its BEFUND_* variables."""
        self.workdir = Path(workdir)
        self.env = dict(env or {})  # on top of the test's environment less its BEFUND_* variables
        self.var = self.workdir / "var"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self._ports_ours = not ({"dicom_port", "http_port"} & set(overrides))  # see start()
        self.config: dict[str, Any] = {
            "ae_title": "BEFUND", "dicom_host": "127.0.0.1", "dicom_port": self.dicom_port,
            "http_port": self.http_port, "var_dir": str(self.var),
            "models_dir": os.environ.get("BEFUND_TEST_MODELS_DIR", str(REFERENCE_MODELS)),
            "token": TOKEN,
            "settle_s": 1.0, "quiet_s": 20.0, "job_workers": 1,
            "delivery": {"initial_backoff_s": 0.5, "max_backoff_s": 2.0},
        }
        if pacs:
            self.config["destinations"] = [pacs]
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key] = {**self.config[key], **value}
            else:
                self.config[key] = value
        self.config_path = self.workdir / "befund.yaml"
        self.log_path = self.workdir / "node.log"
        self.proc: subprocess.Popen | None = None
        self.tls = bool(self.config.get("http_tls"))
        self.ssl_context = ssl.create_default_context(cafile=http_ca) if self.tls else None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def gateway_pid(self) -> int:
        """The gateway's worker process (`--service-name befund`): DICOM listener and HTTP API."""
        for pid in descendants(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--service-name" in argv and argv[argv.index(b"--service-name") + 1:][:1] == [b"befund"]:
                return pid
        raise RuntimeError(f"no gateway worker below process {self.proc.pid}")

    def start(self, timeout: float = 90.0, until: str = "/readyz") -> RunningNode:
        """Start and wait until `until` answers 200 (`/livez` for a node that must not be ready).

        A free port is free only a moment: with test files in parallel another process can bind
        one first, and the node stops at once naming it. On a first start with ports of our own
        choosing, the node then starts again on new ones (a restart keeps its ports)."""
        for attempt in range(3):
            try:
                return self._start(timeout, until)
            except RuntimeError as exc:
                if not (self._ports_ours and "is already in use" in str(exc)) or attempt == 2:
                    raise
                self.dicom_port = self.config["dicom_port"] = free_port()
                self.http_port = self.config["http_port"] = free_port()
        return self

    def _start(self, timeout: float, until: str) -> RunningNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
        env["BEFUND_LOG_LEVEL"] = "INFO"
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BEFUND), "serve", "--config", str(self.config_path), "--host", "127.0.0.1"],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._log = log
        try:
            poll(lambda: self._answers(until), timeout, 0.25, f"node answering {until}")
        except BaseException:
            self.stop()
            raise
        self._ports_ours = False  # started: a restart must come back on the same ports
        return self

    def _answers(self, probe: str) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}{probe}", timeout=2, context=self.ssl_context) as r:
                if r.status != 200:
                    return False
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            # HTTPException: another test's server (not HTTP) holds the port we chose, before
            # the node finds it taken and exits, which start() answers with new ports
            return False
        try:  # the DICOM port accepts connections (a C-ECHO may be refused by the allow-list)
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9 the whole process group: no shutdown hooks, like a power cut for the node."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close_log()

    def stop(self) -> None:
        """Stop the node's `bentoml serve` (see `stop_bentoml`)."""
        if self.proc:
            stop_bentoml(self.proc)
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> RunningNode:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def listener_pid(self) -> int:
        """The pid of the process listening on the node's DICOM port (the gateway)."""
        return pid_listening_on(self.dicom_port)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # --- HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, method: str = "GET", token: str | None = TOKEN,
            body: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", method=method, data=data)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def befund_status(self) -> subprocess.CompletedProcess:
        """`befund status` for this node, as its operator runs it (token from the config)."""
        return subprocess.run([str(BEFUND), "status", "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=60)

    def study(self, study_uid: str) -> dict | None:
        status, body = self.api(f"/studies/{study_uid}")
        return body if status == 200 else None

    def wait_study_state(self, study_uid: str, states: set[str], timeout: float = 60.0) -> dict:
        def check():
            s = self.study(study_uid)
            return s if s and s["state"] in states else None

        try:
            return poll(check, timeout, 0.2, f"study {study_uid} in {states}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last: {self.study(study_uid)}\n{self.log_tail()}") from exc


def pid_listening_on(port: int) -> int:
    """The pid of the process that holds the listening TCP socket on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue  # gone, or not ours to look into
    raise LookupError(f"no process listens on port {port}")
