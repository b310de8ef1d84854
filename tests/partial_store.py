"""A C-STORE that stops in the middle of its data set: the sender of the interrupted-transfer
tests. It negotiates with pynetdicom, then writes the request's P-DATA-TF PDUs (built by
pynetdicom's own encoder) itself and stops after a part of them, leaving the ending to the
caller (release, abort, close, silence, or a kill of this process when run as a script).

    python -m tests.partial_store PORT   # sends half a data set, prints "sent", then waits
"""

from __future__ import annotations

import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

PDU_BYTES = 16384  # small PDUs: many of them, so that half a data set is many fragments on disk
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def store_pdus(ds: Dataset, context_id: int, max_pdu: int = PDU_BYTES) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of a C-STORE request for `ds` (explicit VR little endian)."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = []
    for primitive in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu.encode())
    return out


def start_partial_store(port: int, ds: Dataset, fraction: float = 0.5, ae_title: str = "PARTIAL"):
    """Associate, send the command and `fraction` of the data set's PDUs; return the association."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND", max_pdu=PDU_BYTES)
    if not assoc.is_established:
        raise RuntimeError("association not established")
    pdus = store_pdus(ds, assoc.accepted_contexts[0].context_id)
    for pdu in pdus[:max(2, int(len(pdus) * fraction))]:
        assoc.dul.socket.socket.sendall(pdu)
    return assoc


def main(argv: list[str]) -> int:
    from tests.test_dicom_listener import make_ct

    with tempfile.TemporaryDirectory() as tmp:
        ds = dcmread(make_ct(Path(tmp) / "big.dcm", rows=512, cols=512))
    start_partial_store(int(argv[1]), ds)
    print("sent", flush=True)
    time.sleep(600)  # killed by the test
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
