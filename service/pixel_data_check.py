"""Is the pixel data all there? Checked at receive, so that a cut-short instance is refused
(0xC000 with the reason) instead of acknowledged and found broken when a job decodes it.

Native (uncompressed) syntaxes: Rows x Columns x Samples per Pixel x Bits Allocated x Number of
Frames must fit in the pixel data element's declared length, and that length in the file.
Encapsulated syntaxes: every item (the offset table and each fragment) must fit in the file,
the sequence delimiter must follow the last one, and there must be at least one fragment per
frame (PS3.5 A.4: a fragment never holds data of two frames). What the data decode to is the
decoder's business, later.

Cost on the ingest hot path: arithmetic for native data (the element's place comes with the
header, service/dicom_header.py); one 8-byte read per item for encapsulated data, from a
buffered file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from service.dicom_header import UNDEFINED, PixelElement

ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
# A count the peer controls, bounded before it is walked: a slide level of 1 GB in 1 KB tiles
# has a million fragments; a file of empty items beyond this is refused, not walked for minutes.
MAX_FRAGMENTS = 1 << 20
READ_BUFFER = 64 * 1024


@dataclass(frozen=True)
class PixelGeometry:
    """The header values that say how many bytes native pixel data take."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @classmethod
    def of(cls, header: Any) -> PixelGeometry | None:
        """From a header with `.get(keyword)` (the plain reader's dict or a pydicom Dataset);
        None when a value is missing or not a positive number (then only the fit is checked)."""
        values = []
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
            value = _positive(header.get(keyword))
            if value is None:
                return None
            values.append(value)
        frames = _positive(header.get("NumberOfFrames")) or 1
        return cls(*values, frames)

    @property
    def native_bytes(self) -> int:
        bits = self.rows * self.columns * self.samples * self.frames * self.bits_allocated
        return (bits + 7) // 8

    def __str__(self) -> str:
        return (f"{self.rows}x{self.columns}, {self.samples} sample(s) of {self.bits_allocated} "
                f"bits, {self.frames} frame(s)")


def _positive(value: object) -> int | None:
    try:
        number = int(value)  # IS and US values; a multi-valued one raises
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def pixel_data_problem(path: Path, element: PixelElement | None, geometry: PixelGeometry | None,
                       transfer_syntax: str, file_size: int) -> str:
    """Why the pixel data of the file at `path` are incomplete, or "" when they are not."""
    if element is None:
        return ""  # no pixel data (an SR, a document): nothing to check
    encapsulated = _is_encapsulated(transfer_syntax)
    if element.undefined_length:
        if encapsulated is False:
            return "pixel data of undefined length in a native transfer syntax"
        return _fragments_problem(path, element.offset, file_size,
                                  geometry.frames if geometry else 1)
    in_file = file_size - element.offset
    if element.length > in_file:
        return (f"the pixel data element declares {element.length} bytes, the file holds "
                f"{max(0, in_file)}")
    if encapsulated is False and geometry is not None and element.length < geometry.native_bytes:
        return (f"the pixel data hold {element.length} bytes, {geometry} need "
                f"{geometry.native_bytes}")
    return ""


@lru_cache(maxsize=64)
def _is_encapsulated(transfer_syntax: str) -> bool | None:
    try:
        return UID(transfer_syntax).is_encapsulated
    except ValueError:
        return None  # a private or unknown syntax: only the fit in the file is checked


def _fragments_problem(path: Path, offset: int, file_size: int, frames: int) -> str:
    """Walk the items of encapsulated pixel data: each must fit, the delimiter must come."""
    items = 0
    with open(path, "rb", buffering=READ_BUFFER) as f:
        pos = offset
        while True:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return (f"the encapsulated pixel data end after {max(0, items - 1)} fragment(s) "
                        "without their sequence delimiter")
            tag = int.from_bytes(head[0:2], "little") << 16 | int.from_bytes(head[2:4], "little")
            length = int.from_bytes(head[4:8], "little")
            if tag == SEQUENCE_END:
                break
            if tag != ITEM or length == UNDEFINED:
                return f"the encapsulated pixel data hold a malformed item at byte {pos}"
            pos += 8 + length
            if pos > file_size:
                return (f"fragment {items} of the encapsulated pixel data declares {length} "
                        f"bytes, the file holds {max(0, file_size - (pos - length))}")
            items += 1
            if items > MAX_FRAGMENTS:
                return f"the encapsulated pixel data hold more than {MAX_FRAGMENTS} items"
    fragments = items - 1  # the first item is the basic offset table
    if fragments < frames:
        return f"{frames} frame(s) declared, the encapsulated pixel data hold {max(0, fragments)} fragment(s)"
    return ""
