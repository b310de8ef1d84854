"""A bounded fuzz run over receive-and-route: malformed data into Spool.store, the state DB and routing.

For every input: no crash (a SpoolError subclass or a stored instance, nothing else), never a
file outside the spool, never a partial file (a stored file is byte-identical to what came in,
a refused one leaves nothing but the network layer's own temp file), and a stored instance
indexes and routes without an exception. `BEFUND_FUZZ_EXAMPLES` sets the number of examples
per test (README: Fuzzing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipelines.model_card import load_cards
from service.routing import route_series
from service.spool import Spool, SpoolError, StoredInstance
from service.state_db import StateDB
from tests.test_dicom_listener import make_ct

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("BEFUND_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Receiver:
    """The receive-and-route path without the network: spool, state DB, routing."""

    def __init__(self, sandbox: Path):
        self.sandbox = sandbox
        self.spool = Spool(sandbox / "spool", 0, max_instance_bytes=1 << 20)
        self.db = StateDB(sandbox / "state.sqlite")
        self.cards = load_cards(PROJECT / "models", verify=False)
        self.n = 0
        self.stored = 0

    def files(self) -> set[Path]:
        return {p for p in self.sandbox.parent.rglob("*") if p.is_file()}

    def receive(self, raw: bytes) -> None:
        self.n += 1
        source = self.spool.incoming / f".rx-fuzz-{self.n}"
        source.write_bytes(raw)
        before = self.files()
        try:
            inst = self.spool.store(source, calling_ae="FUZZ", peer_address="127.0.0.1",
                                    association_id="fuzz", indexed=self.db.indexed_instance)
        except SpoolError:
            assert self.files() == before, "a refused instance left files behind"
            source.unlink()
            return
        assert isinstance(inst, StoredInstance)
        if inst.unchanged:  # the same data set as the version already indexed: nothing written
            assert self.files() == before and inst.path.read_bytes()[132:] != b""
            source.unlink()
            return
        root = self.spool.root.resolve()
        assert inst.path.resolve().parent.parent.parent == root, f"{inst.path} escapes the spool"
        assert inst.path == self.spool.path_for(inst.study_uid, inst.series_uid, inst.sop_instance_uid,
                                                inst.version)
        assert inst.path.read_bytes() == raw, "the stored file differs from what was received"
        assert self.files() - before <= {inst.path} and before - self.files() <= {source}
        assert not list(self.spool.root.glob("*/*/.*.tmp"))
        assert self.db.record_instance(inst) is True
        route = route_series(self.db.series(inst.series_uid), self.cards)
        assert route.cards or route.reason
        self.stored += 1
        self.spool.remove(inst.path)  # keep the sandbox small: every check walks it


@pytest.fixture(scope="module")
def receiver():
    with tempfile.TemporaryDirectory() as d:
        sandbox = Path(d) / "node"
        sandbox.mkdir()
        r = Receiver(sandbox)
        yield r
        r.db.close()
        assert 0 < r.stored < r.n, f"{r.stored} of {r.n} inputs stored: the fuzzing is not exploring"
        # nothing may ever appear next to the node's directory (path traversal)
        assert [p.name for p in Path(d).iterdir()] == ["node"]


@pytest.fixture(scope="module")
def valid_part10(tmp_path_factory) -> bytes:
    return make_ct(tmp_path_factory.mktemp("fuzz") / "seed.dcm", rows=8, cols=8).read_bytes()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
)


def mutate(raw: bytes, mutations) -> bytes:
    data = bytearray(raw)
    for kind, where, what in mutations:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= what
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = what
        elif kind == "overwrite":
            data[at:at + len(what)] = what
    return bytes(data)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_part10_bytes_are_refused_cleanly_or_stored_whole(receiver, valid_part10, mutations):
    # most mutations hit the header, where parsing happens: aim half of them at the first 700 bytes
    header_first = [(k, w % 700 if i % 2 == 0 else w, x) for i, (k, w, x) in enumerate(mutations)]
    receiver.receive(mutate(valid_part10, header_first))


uid_like = st.one_of(
    st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,20}){1,4}\Z"),
    st.text(alphabet="0123456789./\\\x00 ", max_size=70),
    st.sampled_from(["../../etc", "1.2/../../x", "..", ".", "", "1." + "9" * 70, "/abs/path"]),
)
text = st.text(max_size=40)


@FUZZ
@given(study=uid_like, series=uid_like, sop=uid_like, sop_class=st.one_of(uid_like, st.just(CTImageStorage)),
       modality=text, body_part=text, description=text, patient=text, instance_number=text,
       frames=text, implicit=st.booleans(), image_type=st.lists(text, max_size=3))
def test_random_datasets_are_refused_cleanly_or_stored_whole(receiver, study, series, sop, sop_class,
                                                             modality, body_part, description, patient,
                                                             instance_number, frames, implicit,
                                                             image_type):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    values = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop,
              "SOPClassUID": sop_class, "Modality": modality, "BodyPartExamined": body_part,
              "SeriesDescription": description, "PatientName": patient,
              "InstanceNumber": instance_number, "NumberOfFrames": frames, "ImageType": image_type}
    for keyword, value in values.items():
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            pass  # pydicom refuses some values outright; the rest go on the wire as they are
    buf = DicomBytesIO()
    try:
        dcmwrite(buf, ds, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, UnicodeError, AttributeError):
        return  # not encodable by pydicom: a sender could not have produced it this way
    receiver.receive(buf.getvalue())
