"""Starts Debian's Orthanc as a PACS next to befund: its own config, storage and ports, in a temp dir.

Used by `make demo` (service/demo.py) and by the tests (tests/orthanc_peer.py).

    with Orthanc("BEFUND", 11112) as pacs:
        run_storescu(files, port=pacs.dicom_port, called_ae=pacs.ae)
        pacs.wait_for(lambda: pacs.instances_in_study(uid), timeout=30)

Orthanc 1.10.1 cannot bind its DICOM port to loopback only, so the config refuses stores from
any AE that is not registered (`DicomAlwaysAllowStore` false) and checks the peer's host
(`DicomCheckModalityHost`): only befund and the named senders, from 127.0.0.1, may store.
HTTP refuses remote clients (`RemoteAccessAllowed` false), so no authentication is configured.
`OverwriteInstances` stays at its default (false) on purpose: a PACS that drops a re-sent
instance with a known SOP Instance UID is what befund must cope with.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service.parent_death import killed_with_this_process

ORTHANC = "/usr/sbin/Orthanc"
LUA_SCRIPT = Path(__file__).resolve().parent / "orthanc_autoforward.lua"
POLL_S = 0.05  # poll interval while waiting on a deadline

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Orthanc:
    """A throwaway Orthanc: `befund` registered as a modality, the auto-forward Lua optional."""

    def __init__(self, befund_ae: str, befund_port: int, lua: bool = True, stable_age: int = 2,
                 ae: str = "ORTHANC", senders: Sequence[str] = (),
                 befund_host: str = "127.0.0.1", start_timeout: float = 30.0,
                 explorer: bool = False, dicom_port: int = 0, http_port: int = 0,
                 name: str = "befund-pacs") -> None:
        self.befund_ae = befund_ae
        self.befund_port = befund_port
        self.befund_host = befund_host
        self.lua = lua
        self.stable_age = stable_age
        self.ae = ae
        self.senders = tuple(senders)
        self.start_timeout = start_timeout
        self.explorer = explorer
        self.name = name
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.dir: Path | None = None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # --- lifecycle ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        assert self.dir is not None
        modalities: dict[str, list] = {"befund": [self.befund_ae, self.befund_host, self.befund_port]}
        for sender in self.senders:
            modalities[f"sender-{sender.lower()}"] = [sender, "127.0.0.1", 104]
        return {
            "Name": self.name,
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [str(LUA_SCRIPT)] if self.lua else [],
            "ConcurrentJobs": 2,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": self.explorer,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": self.ae,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
            "StrictAetComparison": True,
            "DicomModalities": modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
            "DicomAssociationCloseDelay": 0,  # close the association when the store job ends
            "TcpNoDelay": True,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "JobsHistorySize": 50,
            "DeidentifyLogs": True,
            "UnknownSopClassAccepted": False,
            "MetricsEnabled": False,
        }

    def __enter__(self) -> Orthanc:
        self.dir = Path(tempfile.mkdtemp(prefix="befund-orthanc-"))
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config_path = self.dir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.dir / "orthanc.log"
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen([ORTHANC, str(config_path)], cwd=self.dir, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=killed_with_this_process())  # noqa: PLW1509
        try:
            self.wait_for(self._answers, self.start_timeout, what="Orthanc's REST API")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return bool(self.rest_get("/system"))
        except (OSError, urllib.error.URLError):
            return False

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.dir is not None and not any(exc):
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")

    # --- REST ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None
        headers = {}
        if body is not None:
            if isinstance(body, bytes | bytearray):
                data = bytes(body)
                headers["Content-Type"] = "application/dicom"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers,  # noqa: S310
                                         method=method)  # always http://127.0.0.1
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def rest_get(self, path: str) -> Any:
        return self._request("GET", path)

    def rest_post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, body if body is not None else {})

    def rest_delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def upload(self, path: str | Path) -> dict:
        """Store one DICOM file through REST (POST /instances), bypassing DICOM."""
        return self.rest_post("/instances", Path(path).read_bytes())

    def instances_in_study(self, study_uid: str) -> list[str]:
        """Orthanc IDs of the instances stored for a Study Instance UID."""
        return self.rest_post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})

    def find_series(self, study_uid: str, modality: str | None = None) -> list[dict]:
        """Expanded series records of a study, optionally of one modality (e.g. SR for results)."""
        query = {"StudyInstanceUID": study_uid}
        if modality:
            query["Modality"] = modality
        return self.rest_post("/tools/find", {"Level": "Series", "Query": query, "Expand": True})

    def echo_to(self, modality: str = "befund") -> bool:
        """Orthanc's C-ECHO to a registered modality; True when it answered."""
        try:
            self.rest_post(f"/modalities/{modality}/echo", {})
            return True
        except urllib.error.HTTPError:
            return False

    def jobs(self) -> list[dict]:
        return self.rest_get("/jobs?expand")

    # --- waiting -------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
        """Poll `predicate` until it returns something truthy (returned) or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} not reached within {timeout} s; Orthanc log:\n{self.log_tail()}")
            time.sleep(POLL_S)
