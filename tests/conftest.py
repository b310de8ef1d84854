"""Fixtures shared by the end-to-end modules: a DCMTK storescp PACS and a node delivering to it.

Module scope: one node and one PACS per test module (each test uses its own study). A module
that needs a different node or PACS defines its own fixture of the same name.
"""

from __future__ import annotations

import pytest

from tests.dicom_peers import StoreSCP
from tests.node_harness import RunningNode
from tests.pacs_results import ANY_OBJECT_ARGS


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with StoreSCP(tmp_path_factory.mktemp("pacs"), ae="PACS", extra_args=ANY_OBJECT_ARGS) as scp:
        yield scp


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    with RunningNode(tmp_path_factory.mktemp("node"), pacs=f"PACS@127.0.0.1:{pacs.port}") as n:
        yield n


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the whole test session (tests/pg_server.py); each test that
    needs a database asks it for a fresh one."""
    from tests.pg_server import PgServer, have_postgres

    if not have_postgres():
        pytest.fail("PostgreSQL is not installed: `make test` installs the Debian package postgresql")
    with PgServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def state_db_target(request, tmp_path):
    """Where a test's state DB lives, once per backend: an SQLite file, or a fresh PostgreSQL
    database on the session's server."""
    if request.param == "sqlite":
        return tmp_path / "state.sqlite"
    return request.getfixturevalue("pg_server").new_database()
