"""The receiver's promises, checked with real peers (DCMTK storescu/echoscu, a pynetdicom SCU)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom import __version__ as pynetdicom_version

from service import pynetdicom_tuning
from service.config import AllowRule, Config
from service.dicom_listener import DicomListener
from service.spool import InvalidUid, Spool, StoredInstance
from tests.dicom_peers import have_dcmtk, run_echoscu, run_storescu

pytestmark = [pytest.mark.skipif(not have_dcmtk(), reason="DCMTK storescu/echoscu not installed"),
              pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length")]

DEADLINE_S = 20.0


def make_ct(path: Path, *, study: str | None = None, series: str | None = None, sop: str | None = None,
            rows: int = 64, cols: int = 64, frames: int | None = None, seed: int = 0) -> Path:
    """A small valid CT instance with random pixels, written as Explicit VR Little Endian."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "PID-SECRET-42"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "AXIAL 5mm"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shape = (frames, rows, cols) if frames else (rows, cols)
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = rng.integers(0, 4096, size=shape, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


class Recorder:
    """on_instance / on_association_end that remember their calls; optionally fail."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.instances: list[StoredInstance] = []
        self.ends: list[tuple[str, str]] = []
        self.ended = threading.Event()

    def on_instance(self, inst: StoredInstance) -> None:
        if self.fail:
            raise RuntimeError("state DB unavailable")
        assert inst.path.exists()
        self.instances.append(inst)

    def on_association_end(self, association_id: str, calling_ae: str) -> None:
        self.ends.append((association_id, calling_ae))
        self.ended.set()


@pytest.fixture
def node(tmp_path):
    """Start a listener with a given config tweak; yields a factory, stops everything after."""
    started = []

    def start(recorder: Recorder | None = None, **overrides) -> tuple[DicomListener, Recorder, Spool]:
        cfg = replace(Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(tmp_path / "var")),
                      **overrides)
        recorder = recorder or Recorder()
        spool = Spool(cfg.spool_path, cfg.min_free_bytes)
        listener = DicomListener(cfg, spool, recorder.on_instance, recorder.on_association_end)
        listener.start()
        started.append(listener)
        return listener, recorder, spool

    yield start
    for listener in started:
        listener.stop()


def spooled_files(spool: Spool) -> list[Path]:
    """Files with data in the spool (not the empty ones prepared ahead for receiving)."""
    return [p for p in spool.root.rglob("*") if p.is_file()
            and not (p.parent == spool.incoming and p.stat().st_size == 0)]


def wait_until(predicate, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met before the deadline")
        time.sleep(0.01)


def send_with_pynetdicom(port: int, datasets: list[Dataset], ae_title: str = "PYSCU",
                         transfer_syntax: str | None = None) -> list[int]:
    """Send datasets in one association; returns the status of each."""
    ae = AE(ae_title=ae_title)
    for ds in datasets:
        ts = transfer_syntax or ds.file_meta.TransferSyntaxUID
        ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="BEFUND")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_tuning_matches_installed_pynetdicom():
    pynetdicom_tuning.check_compatible()
    assert pynetdicom_version.startswith(pynetdicom_tuning.TESTED_VERSIONS)


def test_echo_succeeds(node):
    listener, _, _ = node()
    result = run_echoscu(port=listener.port)
    assert result.returncode == 0, result.output


def test_stored_instances_are_on_disk_identical_and_indexed_once(node, tmp_path):
    listener, rec, spool = node()
    study, series = generate_uid(), generate_uid()
    files = [make_ct(tmp_path / f"in{i}.dcm", study=study, series=series, seed=i) for i in range(3)]
    result = run_storescu(files, ae="MODALITY", port=listener.port)
    assert result.returncode == 0, result.output
    assert len(rec.instances) == 3
    assert sorted(i.sop_instance_uid for i in rec.instances) == sorted(
        dcmread(f).SOPInstanceUID for f in files)
    for f in files:
        sent = dcmread(f)
        inst = next(i for i in rec.instances if i.sop_instance_uid == sent.SOPInstanceUID)
        assert inst.path == spool.root / study / series / f"{sent.SOPInstanceUID}.dcm"
        got = dcmread(inst.path)
        assert got == sent  # every data element equal, pixel data included
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert inst.calling_ae == "MODALITY" and inst.peer_address == "127.0.0.1"
        assert (inst.modality, inst.body_part, inst.descriptions) == ("CT", "HEAD", ("CT HEAD", "AXIAL 5mm"))
        assert inst.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and inst.instance_number == 1
        assert inst.size == inst.path.stat().st_size
    leftovers = [f for f in spool.incoming.iterdir() if f.stat().st_size]
    assert not leftovers  # only the empty files prepared ahead for the next instances


def test_network_temp_files_land_in_the_spool_so_storing_is_a_rename(node, tmp_path, monkeypatch):
    listener, rec, spool = node()
    sources = []
    original = spool.store

    def recording_store(source, **kw):
        sources.append((Path(source), Path(source).stat().st_ino))
        return original(source, **kw)

    monkeypatch.setattr(spool, "store", recording_store)
    assert run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port).returncode == 0
    [(source, inode)] = sources
    assert source.parent == spool.incoming
    assert rec.instances[0].path.stat().st_ino == inode  # renamed, not copied


def test_association_end_is_reported_once_with_id(node, tmp_path):
    listener, rec, _ = node()
    run_storescu([make_ct(tmp_path / "a.dcm")], ae="MODALITY", port=listener.port)
    assert rec.ended.wait(DEADLINE_S)
    wait_until(lambda: len(rec.ends) >= 1)
    assert rec.ends == [(rec.instances[0].association_id, "MODALITY")]


def test_caller_not_on_allow_list_is_rejected(node, tmp_path):
    listener, rec, spool = node(allow=(AllowRule("PACS", "127.0.0.0/8"),))
    result = run_storescu([make_ct(tmp_path / "a.dcm")], ae="INTRUDER", port=listener.port)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.output or "Rejected" in result.output, result.output
    assert rec.instances == [] and not [p for p in spooled_files(spool)]
    assert run_echoscu(ae="PACS", port=listener.port).returncode == 0


def test_allow_list_checks_the_address_too(node):
    listener, _, _ = node(allow=(AllowRule("*", "10.0.0.0/8"),))
    assert run_echoscu(ae="PACS", port=listener.port).returncode != 0


@pytest.mark.parametrize("bad", ["../../etc", "1.2.3/../4", "1." + "2" * 70, "1..2", ".1.2", "1.2.a"])
def test_invalid_or_traversal_uids_fail_and_write_nothing(node, tmp_path, bad):
    listener, rec, spool = node()
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    ds.SeriesInstanceUID = bad
    statuses = send_with_pynetdicom(listener.port, [ds])
    assert statuses[0] in range(0xC000, 0xD000)
    assert rec.instances == [] and spooled_files(spool) == []
    assert not list(tmp_path.glob("**/etc")) and not (spool.root.parent / "4.dcm").exists()


def test_missing_study_uid_fails(node, tmp_path):
    listener, rec, spool = node()
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    del ds.StudyInstanceUID
    assert send_with_pynetdicom(listener.port, [ds])[0] in range(0xC000, 0xD000)
    assert spooled_files(spool) == []


def test_sop_instance_uid_mismatch_fails(node, tmp_path, monkeypatch):
    listener, rec, spool = node()
    path = make_ct(tmp_path / "a.dcm")
    ds = dcmread(path)
    # The command announces another SOP Instance UID than the data set carries.
    from pynetdicom import dimse_primitives
    original = dimse_primitives.C_STORE.AffectedSOPInstanceUID.fset

    def lie(self, value):
        original(self, "1.2.3.999" if value == ds.SOPInstanceUID else value)

    monkeypatch.setattr(dimse_primitives.C_STORE, "AffectedSOPInstanceUID",
                        property(dimse_primitives.C_STORE.AffectedSOPInstanceUID.fget, lie))
    status = send_with_pynetdicom(listener.port, [ds])[0]
    assert status != 0x0000 and (status in range(0xA900, 0xAA00) or status in range(0xC000, 0xD000))
    assert spooled_files(spool) == []


def test_unparsable_data_fails(node, tmp_path):
    listener, rec, spool = node()
    from pynetdicom import _config
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="BEFUND")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00"
                        + b"\x08\x00\x18\x00UI\xff\xff" + b"\xab" * 64)
    try:
        _config.STORE_SEND_CHUNKED_DATASET = True
        status = assoc.send_c_store(garbage)
    except Exception:  # pynetdicom may refuse to send it at all; then use a raw-bytes dataset
        status = None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    if status is not None and "Status" in status:
        assert int(status.Status) != 0x0000
    assert spooled_files(spool) == [] and rec.instances == []
    assert send_with_pynetdicom(listener.port, [ds]) == [0x0000]  # the node keeps serving


def test_disk_below_watermark_is_out_of_resources_without_partial_file(node, tmp_path):
    listener, rec, spool = node(min_free_bytes=1 << 62)
    assert run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port).returncode != 0
    assert send_with_pynetdicom(listener.port, [dcmread(tmp_path / "a.dcm")]) == [0xA700]
    assert rec.instances == [] and spooled_files(spool) == []


def test_oversize_instance_is_refused(node, tmp_path):
    listener, rec, spool = node(max_instance_bytes=4096)
    assert run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port).returncode != 0
    assert send_with_pynetdicom(listener.port, [dcmread(tmp_path / "a.dcm")]) == [0xA700]
    assert rec.instances == [] and spooled_files(spool) == []


def test_index_failure_is_a_failure_status_and_leaves_no_file(node, tmp_path):
    listener, rec, spool = node(Recorder(fail=True))
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    status = send_with_pynetdicom(listener.port, [ds])[0]
    assert status in range(0xA700, 0xA800)
    assert spooled_files(spool) == []


def test_rle_compressed_instance_is_kept_as_sent(node, tmp_path):
    listener, rec, spool = node()
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    # -xr: storescu proposes RLE Lossless first plus the uncompressed syntaxes; befund must take RLE.
    result = run_storescu([tmp_path / "rle.dcm"], port=listener.port, extra_args=["-xr"])
    assert result.returncode == 0, result.output
    [inst] = rec.instances
    assert inst.transfer_syntax == RLELossless
    got = dcmread(inst.path)
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert got.PixelData == ds.PixelData


def test_patient_data_never_reaches_the_log(node, tmp_path, caplog):
    listener, rec, _ = node()
    caplog.set_level("DEBUG", logger="befund")
    run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port)
    bad = dcmread(make_ct(tmp_path / "b.dcm"))
    bad.StudyInstanceUID = "../x"
    send_with_pynetdicom(listener.port, [bad])
    assert "PID-SECRET-42" not in caplog.text and "Secret" not in caplog.text
    assert "refused" in caplog.text


def test_other_associations_keep_working_while_one_fails(node, tmp_path):
    listener, rec, _ = node()
    bad = dcmread(make_ct(tmp_path / "bad.dcm"))
    bad.SOPInstanceUID = "1.2.x"
    good = make_ct(tmp_path / "good.dcm")
    errors = []
    t = threading.Thread(target=lambda: errors.append(send_with_pynetdicom(listener.port, [bad])))
    t.start()
    assert run_storescu([good], port=listener.port).returncode == 0
    t.join(DEADLINE_S)
    assert errors and errors[0][0] != 0 and len(rec.instances) == 1


def _rss_kib(pid_status: str = "/proc/self/status") -> int:
    for line in Path(pid_status).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_large_instance_is_stored_with_bounded_memory(node, tmp_path):
    listener, rec, spool = node()
    # 64 frames of 512x512x16 bit = 32 MiB, repeated: 64 MiB of pixel data.
    big = make_ct(tmp_path / "big.dcm", rows=512, cols=512, frames=128, seed=7)
    size = big.stat().st_size
    assert size > 64 * 1024 * 1024
    import gc
    gc.collect()
    peak = [_rss_kib()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib())
            stop.wait(0.005)

    before = _rss_kib()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run_storescu([big], port=listener.port, timeout=120)  # storescu is another process
    finally:
        stop.set()
        sampler.join()
    assert result.returncode == 0, result.output
    [inst] = rec.instances
    assert inst.size == inst.path.stat().st_size and inst.number_of_frames == 128
    grown_mib = (peak[0] - before) / 1024
    assert grown_mib < 16, f"listener RSS grew {grown_mib:.1f} MiB for a {size >> 20} MiB instance"


def test_spool_rejects_traversal_uids_before_building_paths(tmp_path):
    spool = Spool(tmp_path / "spool", 0)
    for bad in ("../../etc", "1.2.3/../4", "1." + "1" * 64, "", "1.2.", "1.2\x00/x"):
        with pytest.raises(InvalidUid):
            spool.path_for("1.2", bad, "1.3")
    assert spool.path_for("1.2", "1.3", "1.4") == tmp_path / "spool" / "1.2" / "1.3" / "1.4.dcm"


def test_spool_sweeps_partial_writes_and_lists_only_complete_instances(tmp_path):
    spool = Spool(tmp_path / "spool", 0)
    src = make_ct(tmp_path / "a.dcm")
    inst = spool.store(src, move=False)
    (spool.incoming / ".rx-partial.dcm").write_bytes(b"partial")
    (inst.path.parent / f".{inst.path.name}.abc.tmp").write_bytes(b"partial")
    assert spool.sweep_tmp() == 2
    assert list(spool.iter_instances()) == [inst.path]
    assert dcmread(inst.path) == dcmread(src)
    spool.remove_series(inst.study_uid, inst.series_uid)
    assert list(spool.iter_instances()) == [] and not (spool.root / inst.study_uid).exists()


def test_fast_encoders_match_pydicom_byte_for_byte():
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import create_file_meta, encode

    meta = dict(sop_class_uid=CTImageStorage, sop_instance_uid="1.2.3.45", transfer_syntax=RLELossless)
    expected = DicomBytesIO()
    write_file_meta_info(expected, create_file_meta(**meta))
    assert bytes(pynetdicom_tuning.encode_file_meta(**meta)) == expected.getvalue()

    for status in (0x0000, 0xA700, 0xC000):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
        rsp.Status = status
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        assert pynetdicom_tuning.encode_command_set(msg.command_set, True, True) == encode(
            msg.command_set, True, True)


def test_the_direct_store_response_is_the_pdu_pynetdicom_sends():
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    for status, uid in ((0x0000, "1.2.3.4.5"), (0xA700, "1.2.3.4"), (0xC000, "1.2.840.10008.99")):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 513
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = uid
        rsp.Status = status
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        [pdata] = list(msg.encode_msg(3, 16384))
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        assert pynetdicom_tuning.encode_store_response(
            3, sop_class_uid=CTImageStorage, sop_instance_uid=uid, message_id=513,
            status=status) == pdu.encode()


def test_store_responses_with_an_error_comment_take_pynetdicoms_path(node, tmp_path):
    """The direct path sends only plain responses; one with optional fields goes the long way
    and still reaches the sender (storescu reports the status)."""
    listener, rec, spool = node()
    calls = []
    original = pynetdicom_tuning._StoreResponseSender._sends_directly

    def spy(self, primitive):
        primitive.ErrorComment = "refused for a test"
        result = original(self, primitive)
        calls.append(result)
        return result

    pynetdicom_tuning._StoreResponseSender._sends_directly = spy
    try:
        result = run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port)
    finally:
        pynetdicom_tuning._StoreResponseSender._sends_directly = original
    assert calls == [False]
    assert result.returncode == 0, result.output  # success status, sent by pynetdicom itself
    assert len(rec.instances) == 1


def test_plain_store_responses_are_sent_directly(node, tmp_path, monkeypatch):
    listener, rec, _ = node()
    sent = []
    original = pynetdicom_tuning._StoreResponseSender._encoded

    def counting(self, primitive, context_id):
        pdu = original(self, primitive, context_id)
        sent.append(pdu is not None)
        return pdu

    monkeypatch.setattr(pynetdicom_tuning._StoreResponseSender, "_encoded", counting)
    files = [make_ct(tmp_path / f"{i}.dcm", seed=i) for i in range(3)]
    result = run_storescu(files, port=listener.port)
    assert result.returncode == 0, result.output
    assert sent == [True, True, True] and len(rec.instances) == 3


def test_large_instances_stream_their_middle_fragments_into_the_file(node, tmp_path, monkeypatch):
    """Many PDUs per instance (small max PDU): the middle ones take the direct path, the last
    one pynetdicom's; the stored file is byte for byte what was sent."""
    listener, rec, _ = node(max_pdu=16384)
    streamed = []
    original = pynetdicom_tuning._middle_data_fragments

    def counting(body, context_id):
        found = original(body, context_id)
        streamed.append(found is not None)
        return found

    monkeypatch.setattr(pynetdicom_tuning, "_middle_data_fragments", counting)
    files = [make_ct(tmp_path / f"{i}.dcm", rows=256, cols=256, seed=i) for i in range(2)]
    result = run_storescu(files, port=listener.port)
    assert result.returncode == 0, result.output
    assert streamed.count(True) >= 2 * (256 * 256 * 2 // 16384 - 2), "middle fragments were not streamed"
    assert streamed.count(False) >= 2  # each instance's last fragment went pynetdicom's way
    for f in files:
        inst = next(i for i in rec.instances if i.sop_instance_uid == dcmread(f).SOPInstanceUID)
        assert dcmread(inst.path) == dcmread(f)
        assert dcmread(inst.path).PixelData == dcmread(f).PixelData


def test_only_plain_middle_data_fragments_are_streamed():
    import struct

    def pdv(context: int, control: int, data: bytes) -> bytes:
        return struct.pack(">LBB", len(data) + 2, context, control) + data

    middle = pdv(1, 0x00, b"abcd") + pdv(1, 0x00, b"ef")
    assert pynetdicom_tuning._middle_data_fragments(memoryview(middle), 1) == [(6, 10), (16, 18)]
    for body in (pdv(1, 0x02, b"last"),             # the last fragment: pynetdicom completes it
                 pdv(1, 0x01, b"cmd!"),             # a command fragment
                 pdv(3, 0x00, b"data"),             # another presentation context
                 middle[:-1],                       # truncated
                 struct.pack(">LBB", 1, 1, 0),      # an item too short to hold its header
                 b""):
        assert pynetdicom_tuning._middle_data_fragments(memoryview(body), 1) is None, body


def test_incoming_files_are_prepared_ahead_and_removed_when_the_listener_stops(node, tmp_path):
    listener, rec, spool = node()
    wait_until(listener._incoming._ready.full)
    prepared = {p.name for p in spool.incoming.iterdir()}  # the ready ones, and one on its way
    assert len(prepared) >= listener._incoming._ready.maxsize
    assert all(name.startswith(".rx-") for name in prepared)
    assert all((spool.incoming / name).stat().st_mode & 0o777 == 0o600 for name in prepared)
    sources = []
    original = spool.store

    def recording_store(source, **kw):
        sources.append(Path(source).name)
        return original(source, **kw)

    spool.store = recording_store
    assert run_storescu([make_ct(tmp_path / "a.dcm")], port=listener.port).returncode == 0
    assert sources[0] in prepared, "the instance was not written into a prepared file"
    assert len(rec.instances) == 1
    listener.stop()
    assert list(spool.incoming.iterdir()) == [], "prepared files outlived the listener"


def test_incoming_files_never_make_the_receive_path_wait(tmp_path):
    from service.incoming_files import IncomingFiles

    pool = IncomingFiles(tmp_path, ready=1)
    taken = [pool.take() for _ in range(5)]  # more than are ready: the rest are created at once
    assert len({f.name for f in taken}) == 5
    for f in taken:
        f.write(b"x")
        f.file.flush()
        f.close()
    pool.close()
    assert sorted(p.stat().st_size for p in tmp_path.iterdir()) == [1] * 5


def rejected(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("befund_instances_rejected_total", {"reason": reason}) or 0.0


def test_each_refusal_is_counted_by_a_fixed_reason(node, tmp_path):
    """befund_instances_rejected_total{reason}: one word per kind of refusal, never peer text."""
    before = {r: rejected(r) for r in ("invalid_uid", "out_of_space", "too_large", "state_db")}
    listener, _, _ = node()
    ds = dcmread(make_ct(tmp_path / "a.dcm"))
    ds.SeriesInstanceUID = "1.2.a<script>"
    assert send_with_pynetdicom(listener.port, [ds])[0] in range(0xC000, 0xD000)
    # one after the other: the listeners share a spool, and each one sweeps it when it starts
    for limits in ({"min_free_bytes": 1 << 62}, {"max_instance_bytes": 4096}, {}):
        listener, _, _ = node(Recorder(fail=not limits), **limits)
        assert send_with_pynetdicom(listener.port, [dcmread(tmp_path / "a.dcm")])[0] == 0xA700
    assert {r: rejected(r) - n for r, n in before.items()} == {
        "invalid_uid": 1, "out_of_space": 1, "too_large": 1, "state_db": 1}
    from prometheus_client import REGISTRY

    labels = {s.labels["reason"] for m in REGISTRY.collect() if m.name == "befund_instances_rejected"
              for s in m.samples}
    assert labels <= {"internal", "out_of_space", "too_large", "uid_mismatch", "uid_elsewhere",
                      "invalid_uid", "unreadable", "incomplete_pixel_data", "write_failed", "state_db"}
