"""The spool: received instances as Part 10 files under `<root>/<study>/<series>/<sop>.dcm`.

One job: put a file on disk durably and atomically and say what it is. A file appears under
its final name only complete and fsynced (tmp file or pynetdicom's incoming file, fsync,
rename, fsync of the directory), so a crash leaves either the old state or the new one, plus
tmp leftovers that `sweep_tmp` removes at start-up. UIDs are validated before they become
path components. The header is parsed without pixel data; nothing here holds an instance
whole in memory.

Versions. A SOP Instance UID that is already stored (`IndexedInstance`, from the state DB) and
comes again with the same data set changes nothing. With other content it is a new version,
written beside the current one as `<sop>.v<N>.dcm`: the file an acknowledged row points to is
never overwritten, and never removed by a later failure. The caller removes the old version
(`StoredInstance.replaces`) only after the new row is committed; `Node.reconcile_spool` sorts
out a crash between the two. The same UID under another study or series is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.tag import Tag

from service.dicom_header import PIXEL_ELEMENT, locate_pixel_data, read_file_meta, read_plain_header
from service.pixel_data_check import PixelGeometry, pixel_data_problem

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LEN = 64
INCOMING_DIR = ".incoming"  # the network layer's temp files: same filesystem, so rename not copy
TMP_SUFFIX = ".tmp"
INSTANCE_SUFFIX = ".dcm"
# `<sop>.dcm` is version 1, `<sop>.v<N>.dcm` version N (a UID holds only digits and dots)
INSTANCE_NAME_RE = re.compile(r"^(?P<sop>[0-9]+(?:\.[0-9]+)*?)(?:\.v(?P<version>[1-9][0-9]*))?\.dcm$")
COPY_CHUNK = 8 * 1024 * 1024
DEFER_SIZE = 4096  # header values above this stay on disk while parsing
# In a shared spool another instance's incoming or tmp file untouched this long is a leftover
# (a live transfer writes at least every network_timeout_s, 60 s by default).
SHARED_LEFTOVER_AGE_S = 3600.0

# Only these elements are read from the header (everything else is skipped by seeking).
HEADER_KEYWORDS = (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "StudyDate",
    "AccessionNumber", "Modality", "StudyDescription", "SeriesDescription", "PatientName",
    "PatientID", "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber",
    "NumberOfFrames", "SamplesPerPixel", "Rows", "Columns", "BitsAllocated",
)
HEADER_TAGS = [Tag(k) for k in HEADER_KEYWORDS]


class SpoolError(Exception):
    """An instance the spool refuses; the message names UIDs only, never patient data."""


class InvalidUid(SpoolError):
    """A UID that is missing, malformed, too long, or would escape the spool as a path."""


class UnreadableInstance(SpoolError):
    """Data that does not parse as a DICOM dataset."""


class UidMismatch(SpoolError):
    """The dataset's SOP Instance UID differs from the one the sender announced."""


class OutOfSpace(SpoolError):
    """Free disk below the configured watermark."""


class InstanceTooLarge(SpoolError):
    """An instance above the configured size limit."""


class InstanceElsewhere(SpoolError):
    """The SOP Instance UID is already stored under another study or series."""


class IncompletePixelData(SpoolError):
    """Pixel data shorter than the header declares, or running past the end of the file."""


@dataclass(frozen=True)
class IndexedInstance:
    """What the state DB holds for a SOP Instance UID: where its current version lies."""

    study_uid: str
    series_uid: str
    path: Path
    version: int
    purged: bool = False  # retention removed its file


@dataclass(frozen=True)
class StoredInstance:
    """Everything the state DB and routing need about one stored instance; from the header only.

    patient_name, patient_id, accession and study_date go to the DB for the worklist and are
    never logged.
    """

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    modality: str
    body_part: str
    descriptions: tuple[str, ...]  # study description, series description
    image_type: tuple[str, ...]
    instance_number: int | None
    number_of_frames: int | None
    patient_name: str
    patient_id: str
    accession: str
    study_date: str
    calling_ae: str
    peer_address: str
    association_id: str
    received_at: float
    version: int = 1
    replaces: Path | None = None  # the earlier version's file, to remove once this one is indexed
    unchanged: bool = False  # the same data set as the stored version: nothing to record


def instance_name(sop: str, version: int = 1) -> str:
    """The file name of a version of an instance in its series folder."""
    return f"{sop}{INSTANCE_SUFFIX}" if version == 1 else f"{sop}.v{version}{INSTANCE_SUFFIX}"


def parse_instance_name(name: str) -> tuple[str, int] | None:
    """(SOP Instance UID, version) from a spool file name, or None for any other name."""
    m = INSTANCE_NAME_RE.fullmatch(name)
    if m is None:
        return None
    return m.group("sop"), int(m.group("version") or 1)


def validate_uid(uid: object, what: str) -> str:
    """Return `uid` if it is a well-formed DICOM UID usable as a path component, else raise."""
    text = str(uid or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUid(f"{what} is missing")
    if len(text) > UID_MAX_LEN or not UID_RE.fullmatch(text):
        # the value itself is not shown: a sender may have put anything there, patient data included
        raise InvalidUid(f"{what} {shown_uid(text)} is not a valid UID (digits and dots, at most 64 "
                         "characters)")
    return text


def shown_uid(text: str) -> str:
    """A peer-supplied UID as a log line may show it: itself when well formed, else only its shape."""
    text = str(text)
    if len(text) <= UID_MAX_LEN and UID_RE.fullmatch(text):
        return text
    bad = next((i for i, ch in enumerate(text) if not (ch.isascii() and (ch.isdigit() or ch == "."))), None)
    where = f", first bad character at {bad + 1}" if bad is not None else ""
    return f"(withheld: {len(text)} characters{where})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int_or_none(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _multi(ds, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


class Spool:
    """Files on disk under `root/<study>/<series>/<sop>.dcm`, written atomically and durably."""

    def __init__(self, root: Path, min_free_bytes: int, *, max_instance_bytes: int | None = None,
                 instance: str = ""):
        """`instance`: this instance's name when several share the spool; its incoming files
        then have a folder of their own, and another instance's leftovers go only when old."""
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / INCOMING_DIR / instance if instance else self.root / INCOMING_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.shared = bool(instance)
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------
    def path_for(self, study: str, series: str, sop: str, version: int = 1) -> Path:
        """The final path of a version of an instance; the UIDs are validated before they
        touch a path."""
        study = validate_uid(study, "Study Instance UID")
        series = validate_uid(series, "Series Instance UID")
        sop = validate_uid(sop, "SOP Instance UID")
        return self.root / study / series / instance_name(sop, version)

    def _ensure_dir(self, directory: Path) -> None:
        """Create `directory` (two levels below root) and make the new entries durable."""
        if directory in self._known_dirs:
            return
        with self._dir_lock:
            for d in (directory.parent, directory):
                if d in self._known_dirs:
                    continue
                try:
                    d.mkdir()
                    _fsync_dir(d.parent)
                except FileExistsError:
                    pass
                self._known_dirs.add(d)

    # -- checks ------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_capacity(self, size: int) -> None:
        """Raise when an instance of `size` bytes must be refused (size limit, disk watermark)."""
        if self.max_instance_bytes is not None and size > self.max_instance_bytes:
            raise InstanceTooLarge(f"instance of {size} bytes exceeds the limit of {self.max_instance_bytes}")
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise OutOfSpace(f"free disk {free} bytes is below the watermark of {self.min_free_bytes}")

    # -- reading -----------------------------------------------------------------------------
    def read_header(self, path: Path):
        """Parse the header of a Part 10 file, skipping pixel data and large values.

        The plain case (service/dicom_header.py) needs no pydicom; everything else does.
        """
        plain = read_plain_header(path)
        if plain is not None:
            return plain
        try:
            ds = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE,
                         specific_tags=HEADER_TAGS)
            # Touch the values now so a malformed element fails here, not later.
            for keyword in HEADER_KEYWORDS:
                ds.get(keyword)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except OSError:
            raise  # the disk, not the data: the listener answers out of resources
        except Exception as exc:  # noqa: BLE001 - hostile bytes reach pydicom's parser, which raises
            # many kinds (struct.error, BytesLengthException, IndexError, ...): all mean unreadable
            raise UnreadableInstance(f"dataset does not parse: {type(exc).__name__}") from exc
        return ds, ts

    # -- storing -----------------------------------------------------------------------------
    def store(self, source: Path, *, calling_ae: str = "", peer_address: str = "",
              association_id: str = "", expected_sop_instance_uid: str | None = None,
              expected_sop_class_uid: str | None = None, received_at: float | None = None,
              move: bool = True,
              indexed: Callable[[str], IndexedInstance | None] | None = None) -> StoredInstance:
        """Put the Part 10 file `source` into the spool and describe it.

        `move=True` renames `source` into place when it is on the same filesystem (the
        network layer's incoming file); otherwise its bytes are copied into a tmp file next
        to the final name. Either way: fsync the file, rename, fsync the directory. On any
        refusal nothing is left under the final name; `source` stays for its owner to delete.

        `indexed(sop)` says what the state DB holds for the SOP Instance UID (see the module
        docstring for versions); without it, a file of version 1 already in the series folder
        counts as the stored version. An unchanged re-send returns `unchanged=True` and the
        stored version's path, and leaves `source` alone.
        """
        source = Path(source)
        size = source.stat().st_size
        self.check_capacity(size)
        ds, transfer_syntax = self.read_header(source)
        sop = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        if expected_sop_instance_uid is not None and sop != str(expected_sop_instance_uid).strip():
            raise UidMismatch(f"dataset SOP Instance UID {sop} differs from the command's "
                              f"{shown_uid(str(expected_sop_instance_uid).strip())}")
        sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID")
        if expected_sop_class_uid and sop_class != str(expected_sop_class_uid).strip():
            raise UidMismatch(f"dataset {sop} is of SOP class {sop_class}, the command announced "
                              f"{shown_uid(str(expected_sop_class_uid).strip())}")
        study = validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        series = validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        self._check_pixel_data(source, ds, transfer_syntax, size, sop)
        current = indexed(sop) if indexed is not None else self._on_disk(study, series, sop)
        version, replaces = 1, None
        if current is not None:
            if (current.study_uid, current.series_uid) != (study, series):
                raise InstanceElsewhere(
                    f"SOP Instance UID {sop} is stored in study {current.study_uid} series "
                    f"{current.series_uid}; the same UID in study {study} series {series} is refused")
            stored = Path(current.path)
            if not current.purged and (stored == source or _same_data_set(source, stored)):
                return self._describe(ds, sop, sop_class, transfer_syntax, stored, stored.stat().st_size,
                                      calling_ae, peer_address, association_id, received_at,
                                      version=current.version, unchanged=True)
            version, replaces = current.version + 1, stored
        # every check that can refuse runs before the file gets its final name
        final = self.path_for(study, series, sop, version)
        self._ensure_dir(final.parent)
        if move:
            try:
                _fsync_file(source)
                os.rename(source, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_into(source, final)
        else:
            self._copy_into(source, final)
        _fsync_dir(final.parent)
        return self._describe(ds, sop, sop_class, transfer_syntax, final, size, calling_ae,
                              peer_address, association_id, received_at, version=version,
                              replaces=replaces)

    @staticmethod
    def _describe(ds, sop: str, sop_class: str, transfer_syntax: str, path: Path, size: int,
                  calling_ae: str, peer_address: str, association_id: str, received_at: float | None,
                  *, version: int, replaces: Path | None = None,
                  unchanged: bool = False) -> StoredInstance:
        return StoredInstance(
            path=path, size=size,
            sop_class_uid=sop_class,
            sop_instance_uid=sop,
            series_uid=path.parent.name, study_uid=path.parent.parent.name,
            transfer_syntax=transfer_syntax, modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            descriptions=(_text(ds, "StudyDescription"), _text(ds, "SeriesDescription")),
            image_type=_multi(ds, "ImageType"), instance_number=_int_or_none(ds, "InstanceNumber"),
            number_of_frames=_int_or_none(ds, "NumberOfFrames"),
            patient_name=_text(ds, "PatientName"), patient_id=_text(ds, "PatientID"),
            accession=_text(ds, "AccessionNumber"), study_date=_text(ds, "StudyDate"),
            calling_ae=calling_ae, peer_address=peer_address, association_id=association_id,
            received_at=time.time() if received_at is None else received_at,
            version=version, replaces=replaces, unchanged=unchanged,
        )

    def _on_disk(self, study: str, series: str, sop: str) -> IndexedInstance | None:
        """Without a state DB to ask: version 1 of the instance in its series folder, if there."""
        path = self.path_for(study, series, sop)
        return IndexedInstance(study, series, path, 1) if path.exists() else None

    def _check_pixel_data(self, path: Path, ds, transfer_syntax: str, size: int, sop: str) -> None:
        """Refuse pixel data shorter than declared (service/pixel_data_check.py)."""
        element = ds.get(PIXEL_ELEMENT) if isinstance(ds, dict) else locate_pixel_data(path)
        problem = pixel_data_problem(path, element, PixelGeometry.of(ds), transfer_syntax, size)
        if problem:
            raise IncompletePixelData(f"instance {sop}: {problem}")

    def _copy_into(self, source: Path, final: Path) -> None:
        """Copy without loading: kernel copy into a tmp file beside `final`, fsync, rename."""
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)  # uses sendfile on Linux where possible
                dst.flush()
                os.fsync(dst.fileno())
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def remove(self, path: Path) -> None:
        """Remove one stored file (a version that could not be indexed, or one a newer, indexed
        version replaced) and make that durable."""
        path = Path(path)
        if self.root not in path.parents:
            raise ValueError(f"{path} is not inside the spool")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_dir(path.parent)

    def remove_series(self, study: str, series: str) -> None:
        directory = self.path_for(study, series, "0").parent
        with self._dir_lock:
            self._known_dirs.discard(directory)
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                _fsync_dir(directory.parent)
            with contextlib.suppress(OSError):  # only when empty
                directory.parent.rmdir()
                self._known_dirs.discard(directory.parent)
                _fsync_dir(self.root)

    def sweep_tmp(self) -> int:
        """Remove leftovers of interrupted writes; partial files never count. Returns the count.

        In a shared spool, other instances' incoming and tmp files may be in use: only those
        untouched for SHARED_LEFTOVER_AGE_S go (an instance that died left them)."""
        removed = 0
        for p in list(self.incoming.iterdir()):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
        cutoff = time.time() - SHARED_LEFTOVER_AGE_S if self.shared else float("inf")
        others = [d for d in self.incoming.parent.iterdir() if d != self.incoming and d.is_dir()] \
            if self.shared else []
        for p in [*(f for d in others for f in d.iterdir()), *self.root.glob(f"*/*/.*{TMP_SUFFIX}")]:
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
        for d in others:
            with contextlib.suppress(OSError):  # only when empty
                d.rmdir()
        return removed

    def iter_instances(self) -> Iterator[Path]:
        """Every complete instance file on disk (each version), for reconciling the DB with the
        spool after a crash."""
        for path in self._instance_files():
            if parse_instance_name(path.name) is not None:
                yield path

    def _instance_files(self) -> Iterator[Path]:
        for study in sorted(self.root.iterdir()):
            if study.name.startswith(".") or not study.is_dir():
                continue
            for series in sorted(study.iterdir()):
                if not series.is_dir():
                    continue
                for f in sorted(series.iterdir()):
                    if f.suffix == INSTANCE_SUFFIX and not f.name.startswith("."):
                        yield f


def _same_data_set(a: Path, b: Path) -> bool:
    """True when two Part 10 files hold the same data set in the same transfer syntax (the file
    meta, which the receiver writes itself, may differ). Reads both only when the sizes agree."""
    if not b.exists():
        return False
    meta_a, meta_b = read_file_meta(a), read_file_meta(b)
    if meta_a is None or meta_b is None:
        (start_a, ts_a), (start_b, ts_b) = (0, ""), (0, "")
    else:
        (start_a, ts_a), (start_b, ts_b) = meta_a, meta_b
    if ts_a != ts_b or a.stat().st_size - start_a != b.stat().st_size - start_b:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(start_a)
        fb.seek(start_b)
        while True:
            chunk_a, chunk_b = fa.read(COPY_CHUNK), fb.read(COPY_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True
