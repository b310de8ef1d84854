"""Orthanc as the PACS peer for tests: the product's launcher (service/orthanc_launcher.py)
with the DCMTK test senders (storescu, findscu, echoscu) registered, so they may store.

    with OrthancPeer("BEFUND", 11112) as pacs:
        run_storescu(files, port=pacs.dicom_port, called_ae=pacs.ae)
        pacs.wait_for(lambda: pacs.instances_in_study(uid), timeout=30)
"""

from __future__ import annotations

from service.orthanc_launcher import LUA_SCRIPT, ORTHANC, Orthanc

__all__ = ["LUA_SCRIPT", "ORTHANC", "OrthancPeer"]


TEST_SENDERS = ("STORESCU", "FINDSCU", "ECHOSCU")


class OrthancPeer(Orthanc):
    """Orthanc for one test module or test; the DCMTK tools' default AE titles may store."""

    def __init__(self, befund_ae: str, befund_port: int, **kwargs) -> None:
        kwargs.setdefault("senders", TEST_SENDERS)
        super().__init__(befund_ae, befund_port, **kwargs)
