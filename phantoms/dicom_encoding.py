"""Encode a single-frame grayscale dataset into one of the transfer syntaxes phantoms are sent in.

Checked on this machine (pydicom 3.0.2): RLE Lossless and JPEG 2000 Lossless encode through
`Dataset.compress` (pylibjpeg-rle / pylibjpeg-openjpeg); pydicom has no JPEG Lossless encoder,
so JPEG Lossless SV1 (Process 14, predictor 1) comes from imagecodecs' libjpeg-turbo
(`jpeg8_encode(lossless=True, predictor=1)`), which pydicom (pylibjpeg-libjpeg, gdcm) and
DCMTK's `dcmdjpeg` decode bit-exactly.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

TRANSFER_SYNTAX_UIDS: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg-lossless": JPEGLosslessSV1,
    "j2k-lossless": JPEG2000Lossless,
    "rle": RLELossless,
}
TRANSFER_SYNTAXES = tuple(TRANSFER_SYNTAX_UIDS)


def transfer_syntax_uid(name: str) -> UID:
    """The UID for a short name ('explicit', 'rle', ...); a clear error for an unknown one."""
    try:
        return TRANSFER_SYNTAX_UIDS[name]
    except KeyError:
        raise ValueError(
            f"unknown transfer syntax {name!r}; choose one of {', '.join(TRANSFER_SYNTAXES)}"
        ) from None


def encode(ds: Dataset, name: str) -> Dataset:
    """Set `ds`'s transfer syntax to `name`, compressing its (native) pixel data in place."""
    uid = transfer_syntax_uid(name)
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = uid
        return ds
    if uid == JPEGLosslessSV1:
        return _encode_jpeg_lossless(ds)
    ds.compress(uid)  # pylibjpeg-rle / pylibjpeg-openjpeg (gdcm as the RLE fallback)
    return ds


def _encode_jpeg_lossless(ds: Dataset) -> Dataset:
    import imagecodecs

    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or ds.SamplesPerPixel != 1:
        raise ValueError("JPEG Lossless phantom encoding supports single-frame grayscale only")
    if ds.PixelRepresentation:
        raise ValueError("JPEG Lossless phantom encoding expects unsigned pixel data")
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    pixels = np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns)
    frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return ds
