"""C-STORE SCU for `befund send`: proposes exactly the SOP classes and transfer syntaxes found."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from service.config import Destination

MAX_CONTEXTS = 128


def dicom_files(folder: Path) -> list[Path]:
    """Every file under `folder` that has a DICOM preamble, in name order."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM":
            out.append(path)
    return out


def send_folder(folder: Path, dest: Destination, calling_ae: str = "BEFUNDSCU",
                progress: bool = True, timeout_s: float = 60.0) -> tuple[int, list[tuple[Path, str]]]:
    return send_files(dicom_files(folder), dest, calling_ae, progress, timeout_s)


def send_files(files: list[Path], dest: Destination, calling_ae: str = "BEFUNDSCU",
               progress: bool = True, timeout_s: float = 60.0) -> tuple[int, list[tuple[Path, str]]]:
    """C-STORE `files` in one association: (instances accepted, [(file, why not)])."""
    contexts: dict[str, set[str]] = defaultdict(set)
    readable: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            contexts[ds.SOPClassUID].add(ds.file_meta.TransferSyntaxUID)
            readable.append(path)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            failed.append((path, f"not readable: {exc}"))
    if not readable:
        return 0, failed
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    n = 0
    for sop_class, syntaxes in sorted(contexts.items()):
        for ts in sorted(syntaxes):
            if n < MAX_CONTEXTS:
                ae.add_requested_context(sop_class, ts)
                n += 1
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise ValueError(f"{dest.ae_title}@{dest.host}:{dest.port} refused the association")
    sent = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(readable), unit="inst", desc=f"to {dest.ae_title}")
    try:
        for path in readable:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is None:
                failed.append((path, "no response (association aborted or timed out)"))
                if not assoc.is_established:
                    break
            elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                sent += 1
            else:
                failed.append((path, f"status 0x{code:04X}"))
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
        if assoc.is_established:
            assoc.release()
    return sent, failed
