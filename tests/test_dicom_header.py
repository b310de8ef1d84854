"""The spool's own header reader gives exactly what pydicom gives, or steps aside.

`read_plain_header` (service/dicom_header.py) handles the plain case without pydicom; for
every other file it returns None and the spool parses with pydicom. Compared here on
phantoms of every transfer syntax, slide instances, our own SR, and fuzzed files.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from phantoms.ct_head import write_ct_series
from phantoms.wsi_slide import write_wsi_slide
from service.dicom_header import WANTED, read_plain_header
from service.spool import Spool, UnreadableInstance, _int_or_none, _multi, _text
from tests.test_dicom_listener import make_ct
from tests.test_fuzz_receive import EXAMPLES, mutate, mutation

KEYWORDS = [keyword for keyword, _, _ in WANTED.values()]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


def fields(ds, ts: str) -> dict:
    """What the spool takes from a header, the way it takes it."""
    out = {"ts": str(ts), "ImageType": _multi(ds, "ImageType")}
    for keyword in KEYWORDS:
        if keyword in ("InstanceNumber", "NumberOfFrames"):
            out[keyword] = _int_or_none(ds, keyword)
        elif keyword != "ImageType":
            out[keyword] = _text(ds, keyword)
    return out


def by_pydicom(path: Path) -> dict | None:
    """The fields as pydicom reads them, or None where pydicom cannot."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return fields(ds, ds.file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - pydicom refuses hostile bytes in many ways
        return None


def by_spool(path: Path) -> dict | None:
    try:
        return fields(*Spool(path.parent / "spool", 0).read_header(path))
    except UnreadableInstance:
        return None


def corpus(tmp: Path) -> list[Path]:
    files = [make_ct(tmp / "ct.dcm"), make_ct(tmp / "frames.dcm", frames=3)]
    for ts in ("explicit", "implicit", "jpeg-lossless", "j2k-lossless", "rle"):
        files += write_ct_series(tmp / ts, finding="subdural", slices=2, seed=5, transfer_syntax=ts)
    files += write_wsi_slide(tmp / "wsi", 512, 384, tumor=0.3, seed=3, label=True)
    return files


def test_phantoms_of_every_kind_take_the_plain_path_with_pydicoms_values(tmp_path):
    for path in corpus(tmp_path):
        plain = read_plain_header(path)
        assert plain is not None, f"{path.name} fell back to pydicom"
        assert fields(*plain) == by_pydicom(path), path.name


def test_what_needs_a_character_set_or_another_encoding_is_left_to_pydicom(tmp_path):
    path = make_ct(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.save_as(tmp_path / "utf8.dcm", enforce_file_format=True)
    assert read_plain_header(tmp_path / "utf8.dcm") is None
    assert _text(Spool(tmp_path / "spool", 0).read_header(tmp_path / "utf8.dcm")[0],
                 "PatientName") == "Müller^Jürgen"
    for ts, little in ((ExplicitVRBigEndian, False), (DeflatedExplicitVRLittleEndian, True)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = ts
        other = tmp_path / f"{ts.name}.dcm"
        dcmwrite(other, ds, implicit_vr=False, little_endian=little, enforce_file_format=True)
        assert read_plain_header(other) is None, ts.name
        assert by_spool(other) == by_pydicom(other) is not None


def test_a_wanted_element_with_an_unexpected_vr_is_left_to_pydicom(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.add_new(0x00080018, "OB", b"1.2.3.4\x00")  # SOP Instance UID declared as bytes
    ds.save_as(tmp_path / "ob.dcm", enforce_file_format=True)
    assert read_plain_header(tmp_path / "ob.dcm") is None
    assert by_spool(tmp_path / "ob.dcm") == by_pydicom(tmp_path / "ob.dcm")


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory) -> list[bytes]:
    tmp = tmp_path_factory.mktemp("header-fuzz")
    implicit = write_ct_series(tmp / "implicit", slices=1, seed=2, transfer_syntax="implicit")[0]
    return [make_ct(tmp / "seed.dcm", rows=8, cols=8).read_bytes(), implicit.read_bytes()[:4000]]


@FUZZ
@given(which=st.integers(0, 1), mutations=st.lists(mutation, min_size=1, max_size=6))
def test_fuzzed_headers_give_pydicoms_values_or_none(tmp_path_factory, seed_files, which, mutations):
    raw = seed_files[which]
    aimed = [(k, w % 900 if i % 2 == 0 else w, x) for i, (k, w, x) in enumerate(mutations)]
    path = tmp_path_factory.getbasetemp() / "fuzzed.dcm"
    path.write_bytes(mutate(raw, aimed))
    plain = read_plain_header(path)
    if plain is not None:
        assert fields(*plain) == by_pydicom(path)


@FUZZ
@given(values=st.fixed_dictionaries({k: st.text(max_size=24) for k in (
           "StudyInstanceUID", "SOPInstanceUID", "Modality", "BodyPartExamined", "PatientName",
           "PatientID", "SeriesDescription", "InstanceNumber", "NumberOfFrames", "StudyDate")}),
       image_type=st.lists(st.text(max_size=8), max_size=3), implicit=st.booleans())
def test_random_values_give_pydicoms_values_or_none(tmp_path_factory, values, image_type, implicit):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    for keyword, value in [*values.items(), ("ImageType", image_type)]:
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            pass
    path = tmp_path_factory.getbasetemp() / "random.dcm"
    try:
        dcmwrite(path, ds, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, UnicodeError, AttributeError):
        return
    plain = read_plain_header(path)
    if plain is not None:
        assert fields(*plain) == by_pydicom(path)
