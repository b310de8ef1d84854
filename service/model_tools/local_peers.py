"""The processes a model command starts on this machine: a PACS stand-in, the model service
alone, and a whole node, each with a folder that holds only the model under test.

The PACS is DCMTK's storescp (what the tests use): it writes every object it accepts into a
folder, where the SR is read back. The node is `befund serve` as an operator starts it,
with a generated config and token.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from service.parent_death import killed_with_this_process

PROJECT = Path(__file__).resolve().parent.parent.parent
STORESCP_ARGS = ("--max-pdu", "131072", "+B", "+xa", "-pm")  # every syntax and SOP class, as sent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001, ANN201
    """predicate()'s first truthy value, or TimeoutError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)  # poll interval under a deadline


def only_model(folder: Path, into: Path) -> Path:
    """A models folder that holds `folder` alone, so the node runs this model only.

    The model's files are linked; its card is copied, and a card whose `mode` is not `active`
    (a model in shadow, or disabled) runs active here: the node under test is private, and
    only an active model delivers the SR that `evaluate` reads back.
    """
    import yaml

    source = folder.resolve()
    target = into / source.name
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "card.yaml":
            (target / item.name).symlink_to(item, target_is_directory=item.is_dir())
    text = (source / "card.yaml").read_text()
    data = yaml.safe_load(text)
    if isinstance(data, dict) and data.get("mode") not in (None, "active"):
        print(f"befund: {data.get('name')} is in mode {data['mode']!r}; the test node runs it active")
        text = re.sub(r"(?m)^mode:.*$", "mode: active", text)
    (target / "card.yaml").write_text(text)
    return into


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own loopback URL
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class StoreScp:
    """DCMTK storescp on a free port, writing into `directory`; a context manager."""

    def __init__(self, directory: Path, ae: str = "PACS"):
        if not shutil.which("storescp"):
            raise ValueError("this command needs DCMTK's storescp as the stand-in PACS: "
                             "apt-get install dcmtk (or `make system-deps`)")
        self.directory = Path(directory)
        self.ae = ae
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> StoreScp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae, "-od", str(self.directory), *STORESCP_ARGS, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"},
            preexec_fn=killed_with_this_process())  # noqa: PLW1509 - ends with this command

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        poll(listening, 10, "storescp listening", 0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def address(self) -> str:
        return f"{self.ae}@127.0.0.1:{self.port}"


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to BentoML's arbiter (it stops its workers), then kill what is left."""
    stop_groups([proc], grace_s)


def stop_groups(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """`_stop_group` for several servers at once: all are asked first, then each is waited for."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)


class ModelServiceProcess:
    """`bentoml serve service.model_service:ModelService` on its own, as README "Calling a model
    directly" starts it, serving only the models under `models_dir`."""

    def __init__(self, models_dir: Path, var_dir: Path, provider: str, threads: int):
        self.models_dir, self.var_dir = models_dir, var_dir
        self.provider, self.threads = provider, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ModelServiceProcess:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
        env.update({"BEFUND_VAR_DIR": str(self.var_dir), "BEFUND_MODELS_DIR": str(self.models_dir),
                    "BEFUND_INFERENCE_PROVIDER": self.provider,
                    "BEFUND_INFERENCE_THREADS": str(self.threads),
                    "BENTOML_HOME": str(self.var_dir / "bentoml")})
        log = (self.var_dir / "model_service.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service.model_service:ModelService",
             "--port", str(self.port), "--host", "127.0.0.1", "--working-dir", str(PROJECT)],
            cwd=self.var_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=killed_with_this_process())  # noqa: PLW1509 - ends with this command
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the model service exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            return _http_ok(f"{self.url}/readyz")

        try:
            poll(ready, 180, "model service ready", 0.25)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop_group(self.proc)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = (self.var_dir / "model_service.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class NodeProcess:
    """`befund serve` with its own var dir, ports, token and the given models folder.

    `launch()` returns at once and `wait_ready()` waits, so that several nodes (one per model
    compared) start side by side; `with NodeProcess(...)` does both.
    """

    def __init__(self, workdir: Path, models_dir: Path, pacs: str, provider: str = "cpu",
                 settle_s: float = 1.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(32)
        self.config: dict[str, Any] = {
            "ae_title": "BEFUND", "dicom_host": "127.0.0.1", "dicom_port": free_port(),
            "http_port": free_port(), "var_dir": str(self.workdir / "var"),
            "models_dir": str(models_dir), "token": self.token, "destinations": [pacs],
            "settle_s": settle_s, "inference_provider": provider,
            "delivery": {"initial_backoff_s": 0.5, "max_backoff_s": 2.0},
        }
        self.url = f"http://127.0.0.1:{self.config['http_port']}"
        self.log_path = self.workdir / "befund.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> NodeProcess:
        import yaml

        config_path = self.workdir / "befund.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEFUND_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "befund"), "serve", "--config", str(config_path),
                 "--host", "127.0.0.1"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=killed_with_this_process())  # noqa: PLW1509 - ends with this command
        return self

    def wait_ready(self, timeout: float = 240.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"befund serve exited with {self.proc.returncode}; see {self.log_path}")
            return _http_ok(f"{self.url}/readyz")

        poll(ready, timeout, f"the node ({self.log_path})", 0.25)

    def __enter__(self) -> NodeProcess:
        try:
            self.launch().wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop_group(self.proc)

    @property
    def dicom_port(self) -> int:
        return int(self.config["dicom_port"])

    @property
    def db_path(self) -> Path:
        return Path(self.config["var_dir"]) / "state.sqlite"

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", headers={  # noqa: S310
            "Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 - our own loopback URL
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return self.api(f"/studies/{study_uid}")

    def series_completed_at(self, study_uid: str) -> float | None:
        """When the node declared the study's series complete (read-only look at its SQLite)."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute("SELECT MAX(completed_at) FROM series WHERE study_uid=?",
                             (study_uid,)).fetchone()
        finally:
            db.close()
        return row[0] if row else None
