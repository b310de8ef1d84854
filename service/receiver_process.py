"""One more DICOM receiver process of a node (`receive_workers` > 1): listener, spool, state DB.

All DICOM receive of one process runs under one interpreter lock: measured on 2 cores, one
association took 60-80 MB/s and four parallel ones together only 59 MB/s. The node therefore
runs `receive_workers` processes on the DICOM port (SO_REUSEPORT; the kernel spreads new
connections over them): the gateway's own listener and N-1 of these, started and restarted by
service/receiver_pool.py. Each one acknowledges exactly as the gateway does (the same
DicomListener: write, fsync, rename, row committed, then 0x0000) and keeps the same gate
(service/connection_gate.py): the A-ASSOCIATE-RQ deadline is per connection, so it holds in
every process; `max_connections_per_address` and `max_associations` are counted per process,
so one address holds at most N x 16 of N x 32 slots, the same share as with one process.

Only with PostgreSQL: an ended association here wakes the completion watchers of every
instance through NOTIFY. Each process is its own instance in the associations table
(`<instance>-r<k>`, stable while the node runs), so a restarted receiver ends the associations
its dead predecessor left open, and no other's. It ends when its parent dies
(service/parent_death.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from service import metrics
from service.config import load_config
from service.dicom_listener import DicomListener
from service.logging_setup import configure_logging
from service.parent_death import die_with_parent
from service.private_files import keep_files_private
from service.spool import Spool, StoredInstance
from service.state_db import StateDB

log = logging.getLogger("befund.receive")


class Receiver:
    """The listener with what it writes to: the spool and the state DB, nothing else."""

    def __init__(self, owner: str) -> None:
        config = load_config()
        self.db = StateDB(config.database_url, instance_id=owner,
                          pool_size=min(config.database_pool_size, 4),
                          timeout_s=config.database_timeout_s)
        self.spool = Spool(config.spool_path, config.min_free_bytes,
                           max_instance_bytes=config.max_instance_bytes, instance=owner)
        self.db.end_associations_left_open(owner, time.time())
        self.listener = DicomListener(config, self.spool, self._on_instance, self._on_end,
                                      indexed=self.db.indexed_instance, reuse_port=True)

    def _on_instance(self, inst: StoredInstance) -> None:
        if self.db.record_instance(inst):
            metrics.INSTANCES_RECEIVED.labels(inst.modality or "unknown").inc()
            metrics.BYTES_RECEIVED.inc(inst.size)
        else:
            metrics.INSTANCES_DUPLICATE.labels(inst.modality or "unknown").inc()

    def _on_end(self, association_id: str, calling_ae: str) -> None:
        metrics.ASSOCIATIONS.labels("accepted").inc()
        self.db.record_association_end(association_id, time.time())

    def run(self, stop: threading.Event) -> None:
        self.listener.start()
        log.info("receiver process %s listening on port %d", self.db.instance_id, self.listener.port)
        stop.wait()
        self.listener.stop()
        self.db.close()


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    keep_files_private()
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--owner", required=True, help="this process's name in the associations table")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Receiver(args.owner).run(stop)


if __name__ == "__main__":
    main()
