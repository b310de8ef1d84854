"""The C-STORE / C-ECHO SCP: receive instances, put them durably in the spool, index them.

An instance is acknowledged (0x0000) only after its file is fsynced and renamed into the
spool and `on_instance` (the state DB) has returned. Every refusal is a failure status with a
reason in the log that names UIDs only. One small handler per event; nothing slow runs in a
handler beyond the write and the index call.

A SOP Instance UID sent again: the same data set is acknowledged and changes nothing; other
content is a new version beside the old file, whose removal waits until the new row is
committed, so a failure never removes a file an acknowledged row points to; the same UID
under another study or series is refused (0xA900). The data set's file refuses to grow past
the disk watermark or the size limit while it arrives (service/incoming_files.py): the
instance is answered 0xA700 and the association goes on. Files of data sets whose association
ended before they were complete are removed when it ends.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from service import metrics, pynetdicom_tuning
from service.config import Config
from service.connection_gate import ConnectionGate, start_server
from service.incoming_files import IncomingFile, IncomingFiles, SpaceGuard
from service.spool import (
    IncompletePixelData,
    IndexedInstance,
    InstanceElsewhere,
    InstanceTooLarge,
    InvalidUid,
    OutOfSpace,
    Spool,
    SpoolError,
    StoredInstance,
    UidMismatch,
    UnreadableInstance,
    shown_uid,
)

LOG = logging.getLogger("befund.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling / called AE title not recognised
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)

# Lossless compressed syntaxes first (accepted as proposed, no decompression by the sender),
# then the uncompressed ones, then everything else (lossy only when the sender offers nothing
# better), deflate last (some tools cannot read it back).
_PREFERRED_FIRST = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
)
_DEFLATED = "1.2.840.10008.1.2.1.99"
ACCEPTED_TRANSFER_SYNTAXES = [
    *[ts for ts in _PREFERRED_FIRST if ts in ALL_TRANSFER_SYNTAXES],
    *[ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _PREFERRED_FIRST and ts != _DEFLATED],
    _DEFLATED,
]

_STATUS_FOR = {
    OutOfSpace: STATUS_OUT_OF_RESOURCES,
    InstanceTooLarge: STATUS_OUT_OF_RESOURCES,
    UidMismatch: STATUS_DATASET_MISMATCH,
    InstanceElsewhere: STATUS_DATASET_MISMATCH,
    InvalidUid: STATUS_CANNOT_UNDERSTAND,
    UnreadableInstance: STATUS_CANNOT_UNDERSTAND,
    IncompletePixelData: STATUS_CANNOT_UNDERSTAND,
}
# The `reason` label of befund_instances_rejected_total: one fixed word per kind of refusal,
# never the exception's text (bounded: a peer cannot make new label values).
_REASON_FOR = {
    OutOfSpace: "out_of_space",
    InstanceTooLarge: "too_large",
    UidMismatch: "uid_mismatch",
    InstanceElsewhere: "uid_elsewhere",
    InvalidUid: "invalid_uid",
    UnreadableInstance: "unreadable",
    IncompletePixelData: "incomplete_pixel_data",
}
# One SOP Instance UID is stored by one association at a time (from the look-up of its stored
# version to the commit of the new one); UIDs share these locks by hash.
SOP_LOCK_STRIPES = 256


@dataclass
class _Association:
    """What the listener remembers about one accepted association."""

    association_id: str
    calling_ae: str
    peer_address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0


class DicomListener:
    """C-STORE and C-ECHO SCP writing to `spool` and indexing through `on_instance`."""

    def __init__(self, config: Config, spool: Spool,
                 on_instance: Callable[[StoredInstance], None],
                 on_association_end: Callable[[str, str], None],
                 indexed: Callable[[str], IndexedInstance | None] | None = None,
                 reuse_port: bool = False):
        """`indexed(sop)`: where the state DB holds the instance's current version (without
        it, the spool looks in the series folder; see `Spool.store`). `reuse_port`: other
        receiver processes of this node listen on the same ports (service/receiver_pool.py)."""
        self.reuse_port = reuse_port
        self.config = config
        self.spool = spool
        self.on_instance = on_instance
        self.on_association_end = on_association_end
        self.indexed = indexed
        self._sop_locks = [threading.Lock() for _ in range(SOP_LOCK_STRIPES)]
        self._server = None
        self._tls_server = None
        self._ae: AE | None = None
        self._incoming: IncomingFiles | None = None
        self._gate: ConnectionGate | None = None
        self._assocs: dict[int, _Association] = {}
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving in background threads (returns at once)."""
        pynetdicom_tuning.apply()
        # pydicom warns about invalid values with the value in the message ("Invalid value for VR
        # UI: '<whatever the sender put there>'"), which the node's log would then carry, patient
        # data included. The spool validates what it relies on (UIDs) itself.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        self.spool.sweep_tmp()
        if self.config.max_pdu <= 0:
            raise ValueError("max_pdu must be greater than 0: it bounds every P-DATA-TF a peer may send")
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_s
        # An accepted association waits this long for its A-ASSOCIATE indication, and after an
        # abort or release for the peer to close (ARTIM), holding a slot of max_associations
        # (pynetdicom's default: 30 s). The connection gate has read the request already.
        ae.acse_timeout = self.config.association_request_timeout_s
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        guard = SpaceGuard(str(self.spool.incoming), self.spool.min_free_bytes,
                           self.config.max_instance_bytes)
        self._incoming = pynetdicom_tuning.set_incoming_dir(ae, self.spool.incoming, guard)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
        ]
        self._ae = ae
        self._gate = ConnectionGate(self.config)
        self._server = start_server(ae, (self.config.dicom_host, self.config.dicom_port), handlers,
                                    self._gate, reuse_port=self.reuse_port)
        LOG.info("listening as %s on %s:%d", self.config.ae_title, self.config.dicom_host, self.port)
        if self.config.tls.enabled:
            self._tls_server = start_server(
                ae, (self.config.dicom_host, self.config.tls.port), handlers, self._gate,
                ssl_context=server_tls_context(self.config), name="dicom-tls-accept",
                reuse_port=self.reuse_port)
            LOG.info("listening with DICOM TLS on %s:%d (client certificate %s)", self.config.dicom_host,
                     self.tls_port, "required" if self.config.tls.require_client_cert else "optional")

    def stop(self) -> None:
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            LOG.info("listener stopped")
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None

    def serving(self) -> bool:
        """True while every port this listener opened accepts associations."""
        servers = [self._server] + ([self._tls_server] if self.config.tls.enabled else [])
        return all(pynetdicom_tuning.serving(s) for s in servers)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener is not started")
        return self._server.server_address[1]

    @property
    def tls_port(self) -> int:
        if self._tls_server is None:
            raise RuntimeError("the TLS listener is not started")
        return self._tls_server.server_address[1]

    # -- handlers: one small function per event ----------------------------------------------
    def _on_conn_open(self, event) -> None:
        sock = event.assoc.dul.socket.socket
        pynetdicom_tuning.tune_socket(sock)
        if sock is not None:
            # A peer that stops in the middle of a PDU leaves the DUL blocked in recv(), where
            # pynetdicom's idle timer never fires: the socket's own timeout drops it instead.
            sock.settimeout(self.config.network_timeout_s)
        pynetdicom_tuning.inline_store_requests(event.assoc)
        self._gate.guard(event.assoc)  # after the reader above: it checks each PDU header first

    def _on_requested(self, event) -> None:
        """Refuse callers not on the allow-list, and requests for another AE title, before
        anything is negotiated."""
        ae_title = _calling_ae(event)
        address = event.assoc.requestor.address
        called = str(event.assoc.requestor.primitive.called_ae_title or "").strip()
        if not self.config.is_allowed(ae_title, address):
            LOG.warning("rejected association from %r at %s: not on the allow-list", ae_title, address)
            reject = REJECT_CALLING_AE
        elif called != self.config.ae_title.strip():
            LOG.warning("rejected association from %r at %s: called AE title %r is not this node's (%s)",
                        ae_title, address, called[:16], self.config.ae_title)
            reject = REJECT_CALLED_AE
        else:
            return
        event.assoc.acse.send_reject(*reject)
        event.assoc.kill()  # as pynetdicom's own rejections do: wait until the RJ is sent

    def _on_accepted(self, event) -> None:
        record = _Association(uuid.uuid4().hex, _calling_ae(event), event.assoc.requestor.address)
        with self._lock:
            self._assocs[id(event.assoc)] = record
        LOG.info("association %s from %s at %s accepted", record.association_id, record.calling_ae,
                 record.peer_address)

    def _on_rejected(self, event) -> None:
        """pynetdicom refused an association itself: more than max_associations are open."""
        LOG.warning("rejected association from %r at %s: max_associations (%d) reached",
                    _calling_ae(event), event.assoc.requestor.address, self.config.max_associations)

    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event) -> int:
        """Persist one instance, index it, and only then acknowledge."""
        record = self._assocs.get(id(event.assoc))
        if record is None:  # cannot happen for an accepted association; refuse rather than guess
            metrics.INSTANCES_REJECTED.labels("internal").inc()
            return STATUS_OUT_OF_RESOURCES
        sop = str(event.request.AffectedSOPInstanceUID or "")
        incoming = _incoming_file(event)
        if incoming is not None and not incoming.claim():  # the disk, the size limit, a write error
            return self._refused(record, sop, STATUS_OUT_OF_RESOURCES, incoming.failed,
                                 _incoming_reason(incoming.failed))
        started = time.monotonic()
        with self._sop_locks[hash(sop) % SOP_LOCK_STRIPES]:
            try:
                self._check_size(event.dataset_path)
                stored = self.spool.store(event.dataset_path, calling_ae=record.calling_ae,
                                          peer_address=record.peer_address,
                                          association_id=record.association_id,
                                          expected_sop_instance_uid=sop,
                                          expected_sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
                                          indexed=self.indexed)
            except SpoolError as exc:
                return self._refused(record, sop, _STATUS_FOR.get(type(exc), STATUS_CANNOT_UNDERSTAND),
                                     str(exc), _REASON_FOR.get(type(exc), "unreadable"))
            except OSError as exc:
                record.failed += 1
                metrics.INSTANCES_REJECTED.labels("write_failed").inc()
                LOG.error("instance %s not stored (0xA700): %s", _safe_uid(sop), exc.strerror or exc)
                return STATUS_OUT_OF_RESOURCES
            except Exception as exc:  # noqa: BLE001 - e.g. the state DB's look-up: a failure status
                record.failed += 1
                metrics.INSTANCES_REJECTED.labels("state_db").inc()
                LOG.error("instance %s not stored (0xA700): %s", _safe_uid(sop), type(exc).__name__)
                return STATUS_OUT_OF_RESOURCES
            status = STATUS_SUCCESS if stored.unchanged else self._index(record, stored)
        if status != STATUS_SUCCESS:
            return status
        record.stored += 1
        record.bytes += stored.size
        LOG.debug("stored %s of series %s%s, %d bytes in %.1f ms", stored.sop_instance_uid,
                  stored.series_uid, " (unchanged re-send)" if stored.unchanged else "", stored.size,
                  (time.monotonic() - started) * 1000)
        return STATUS_SUCCESS

    def _index(self, record: _Association, stored: StoredInstance) -> int:
        """Record a stored version in the state DB; then the version it replaces may go."""
        try:
            self.on_instance(stored)
        except Exception as exc:  # noqa: BLE001 - any index failure must become a failure status
            # Only the file just written goes: a version that an acknowledged row points to lies
            # under another name (Spool.store never writes over it).
            self._remove(stored.path)
            if isinstance(exc, SpoolError):
                return self._refused(record, stored.sop_instance_uid,
                                     _STATUS_FOR.get(type(exc), STATUS_CANNOT_UNDERSTAND), str(exc),
                                     _REASON_FOR.get(type(exc), "unreadable"))
            record.failed += 1
            metrics.INSTANCES_REJECTED.labels("state_db").inc()
            LOG.error("instance %s of series %s not indexed, its new file removed (0xA700): %s",
                      stored.sop_instance_uid, stored.series_uid, type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        if stored.replaces is not None:
            self._remove(stored.replaces)
            LOG.info("instance %s of series %s: version %d replaces the one stored before",
                     stored.sop_instance_uid, stored.series_uid, stored.version)
        return STATUS_SUCCESS

    def _refused(self, record: _Association, sop: str, status: int, reason: str, label: str) -> int:
        """Count and log a refusal; `label` is the metric's bounded reason, `reason` the log's."""
        record.failed += 1
        metrics.INSTANCES_REJECTED.labels(label).inc()
        LOG.warning("instance %s refused (0x%04X): %s", _safe_uid(sop), status, reason)
        return status

    def _remove(self, path: Path) -> None:
        try:
            self.spool.remove(path)
        except OSError as exc:  # the instance's fate is decided; a leftover is reconciled at start
            LOG.error("could not remove %s from the spool: %s", path.name, exc.strerror or exc)

    def _check_size(self, path: Path) -> None:
        size = Path(path).stat().st_size
        if size > self.config.max_instance_bytes:
            raise InstanceTooLarge(
                f"instance of {size} bytes exceeds max_instance_bytes {self.config.max_instance_bytes}")

    def _on_end(self, event) -> None:
        """Note the end of an accepted association once (released, aborted or closed), and
        remove the file of a data set it left incomplete."""
        if self._incoming is not None:
            self._incoming.discard_abandoned(owner=event.assoc.dul)
        with self._lock:
            record = self._assocs.pop(id(event.assoc), None)
        if record is None:
            return
        seconds = time.monotonic() - record.started
        LOG.info("association %s from %s ended (%s): %d stored, %d refused, %.1f MB in %.2f s",
                 record.association_id, record.calling_ae, event.event.name.removeprefix("EVT_"),
                 record.stored, record.failed, record.bytes / 1e6, seconds)
        try:
            self.on_association_end(record.association_id, record.calling_ae)
        except Exception:
            LOG.exception("on_association_end failed for association %s", record.association_id)


def server_tls_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context: our certificate, and the CA that client certificates must chain to."""
    tls = config.tls
    if not (tls.cert and tls.key):
        raise ValueError("tls.enabled needs tls.cert and tls.key (PEM files)")
    if tls.require_client_cert and not tls.ca:
        raise ValueError("tls.require_client_cert needs tls.ca, the CA that signs client certificates")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _calling_ae(event) -> str:
    title = event.assoc.requestor.ae_title
    if not title and event.assoc.requestor.primitive is not None:
        title = event.assoc.requestor.primitive.calling_ae_title
    return str(title or "").strip()


def _incoming_reason(failed: str) -> str:
    """The metric's reason for an incoming file that stopped (service/incoming_files.py)."""
    if "max_instance_bytes" in failed:
        return "too_large"
    if "watermark" in failed:
        return "out_of_space"
    return "write_failed"


def _incoming_file(event) -> IncomingFile | None:
    """The file pynetdicom received the data set into, when it is one of ours."""
    found = getattr(event.request, "_dataset_file", None)
    return found if isinstance(found, IncomingFile) else None


def _safe_uid(text: str) -> str:
    """A UID for a log line: the peer chose it, so only a well-formed UID is shown as it is."""
    return shown_uid(text.strip())


def spool_for(config: Config) -> Spool:
    """The spool configured for this node."""
    return Spool(Path(config.spool_path), config.min_free_bytes,
                 max_instance_bytes=config.max_instance_bytes)
