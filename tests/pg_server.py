"""A real PostgreSQL server for tests: Debian's initdb and pg_ctl in a temporary directory, on
a free loopback port, trust authentication, stopped and removed at the end.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the `postgres` user that
Debian's package creates (or `nobody`), in a directory of its own under /tmp (pytest's
tmp_path is private to root). `make test` installs the package when it is missing.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.dicom_peers import free_port

START_TIMEOUT_S = 60


def pg_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: Debian's /usr/lib/postgresql/<newest>/bin, else $PATH."""
    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def have_postgres() -> bool:
    return pg_bin_dir() is not None


class PgServer:
    """One PostgreSQL cluster; `url(dbname)` for clients, `new_database()` for a fresh one."""

    def __init__(self) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; "
                               "`make test` installs it)")
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="befund-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = None
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            self._user = pwd.getpwnam(name)
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._counter = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", "befund", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user.pw_name, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
                               f"{self.log.read_text() if self.log.exists() else ''}")
        return proc

    def start(self) -> PgServer:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", str(START_TIMEOUT_S), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        proc = subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True, text=True, timeout=30) if self._user is None else \
            subprocess.run(["runuser", "-u", self._user.pw_name, "--", str(self.bindir / "pg_ctl"),
                            "-D", str(self.data), "status"], capture_output=True, text=True, timeout=30)
        return proc.returncode == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://befund@127.0.0.1:{self.port}/{dbname}"

    def new_database(self, prefix: str = "test") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
