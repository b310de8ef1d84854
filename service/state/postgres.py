"""The PostgreSQL backend: several befund instances share one state DB (psycopg 3, a pool).

Durability: every connection runs with `synchronous_commit=on` whatever the server's default,
so the commit of an instance's row, which precedes its acknowledgement, is on the server's
disk. Leases are taken with `SELECT ... FOR UPDATE SKIP LOCKED` (`skip_locked`), so two
instances never take the same job or delivery, and neither waits for the other.

Waiting threads wake on LISTEN/NOTIFY: a transaction's `notify(channel)` becomes `NOTIFY
befund_<channel>` at its commit, and one listening connection per instance hands each
notification to this process's subscribers. When that connection is lost it reconnects and
wakes every subscriber once, so nothing announced during the gap is missed.

When the server is gone, calls fail within `timeout_s` (the pool's wait for a connection) with
an error in `errors`: the listener answers C-STORE with 0xA700, the threads log and try again,
and the pool reconnects by itself when the server is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from service.state.backend import CHANNELS, Notifications, Tx, pyformat

log = logging.getLogger("befund.state")

LISTEN_POLL_S = 1.0  # how often the listening thread looks up from its wait to see if it must stop
RECONNECT_GIVE_UP_S = 10.0  # the pool's background reconnection; a request starts a new one


class PostgresTx(Tx):
    def __init__(self, conn: psycopg.Connection):
        super().__init__()
        self._conn = conn

    def execute(self, sql: str, args: tuple | list = ()) -> Any:
        return self._conn.execute(pyformat(sql), tuple(args))


def _redacted(url: str) -> str:
    """The URL without its password, for logs and /status."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host, port, name = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"PostgreSQL {host}{':' + str(port) if port else ''}/{name}"


class PostgresBackend:
    """PostgreSQL through a connection pool; `url` is a libpq URL (postgresql://...)."""

    name = "postgresql"
    shared = True  # other instances may hold leases: only leases of this instance_id are ours
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    errors: tuple[type[BaseException], ...] = (psycopg.Error,)
    poll_cap_s = 30.0  # NOTIFY wakes waiting threads; this only bounds a wait no one ends

    def __init__(self, url: str, *, pool_size: int = 16, timeout_s: float = 5.0):
        self.url = url
        self.timeout_s = timeout_s
        self.notifications = Notifications()
        self.listening = threading.Event()  # set while this instance receives NOTIFYs
        self._closed = threading.Event()
        connect_timeout = max(1, int(timeout_s))
        self.pool = ConnectionPool(
            url, min_size=min(2, pool_size), max_size=pool_size, timeout=timeout_s,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": connect_timeout,
                    "options": "-c synchronous_commit=on"},
            check=ConnectionPool.check_connection, reconnect_timeout=RECONNECT_GIVE_UP_S,
            name="befund-state", open=False)
        self.pool.open(wait=True, timeout=max(timeout_s, 10.0))
        self._listener = threading.Thread(target=self._listen, name="state-db-listen", daemon=True)
        self._listener.start()

    def describe(self) -> str:
        return _redacted(self.url)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as conn, conn.transaction():
            tx = PostgresTx(conn)
            yield tx
            for channel in sorted(tx.channels):  # delivered to every listener at the commit
                conn.execute(f"NOTIFY befund_{channel}")
        self.notifications.dispatch(tx.channels)  # this process's waiters need no round trip

    def query(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return conn.execute(pyformat(sql), tuple(args)).fetchall()

    def lock(self, tx: Tx, key: str) -> None:
        """Serialise the transactions that take the same `key` until they end (an advisory lock)."""
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    def ping(self, timeout_s: float) -> None:
        with self.pool.connection(timeout=timeout_s) as conn:
            conn.execute("SELECT 1 FROM jobs LIMIT 1")

    def table_columns(self) -> dict[str, set[str]]:
        rows = self.query("""SELECT table_name AS t, column_name AS c FROM information_schema.columns
                             WHERE table_schema = current_schema()""")
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["t"], set()).add(r["c"])
        return out

    def close(self) -> None:
        self._closed.set()
        self.pool.close()
        self._listener.join(timeout=LISTEN_POLL_S * 3)

    def _listen(self) -> None:
        """Hand NOTIFYs to this process's subscribers; reconnect when the connection is lost."""
        lost = False
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True,
                                     connect_timeout=max(1, int(self.timeout_s))) as conn:
                    for channel in CHANNELS:
                        conn.execute(f"LISTEN befund_{channel}")
                    self.listening.set()
                    if lost:
                        log.info("state DB notifications resumed")
                        self.notifications.dispatch(CHANNELS)  # what was announced meanwhile
                    lost = False
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            self.notifications.dispatch([note.channel.removeprefix("befund_")])
            except psycopg.Error as exc:
                self.listening.clear()
                if not lost:
                    log.warning("state DB notifications lost (%s); reconnecting", type(exc).__name__)
                lost = True
                self._closed.wait(1.0)
