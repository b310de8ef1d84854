"""The AI result SR (IHE AIR, TID 1500): it reads back as written and passes the validators.

Source headers are built here with pydicom (a small head CT series and one whole-slide image
level); the SR is written as a Part 10 file and checked with the real `dciodvfy`, `dsrdump`
and, where Java and Debian's libpixelmed-java are installed, PixelMed's DicomSRValidator.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines import dicom_codes as dc
from pipelines.findings import AnalysisResult, KeyImage
from pipelines.model_card import parse_card
from pipelines.result_uids import device_uid, is_valid_uid, result_uids
from pipelines.sr_encoding import build_result_sr
from pipelines.sr_reading import read_result_sr

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
WSI_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
CT_SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
WSI_SERIES_UID = "1.2.826.0.1.3680043.8.498.2002"
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Modern Java needs the XPath limits lifted (ANCHORS.md); C1-only JIT and the serial GC halve the
# CPU time of one validation (36 s -> 17 s here), which is XSLT compilation, not checking.
PIXELMED_FLAGS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                  "-Djdk.xml.xpathTotalOpLimit=0", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
WHEN = datetime(2024, 5, 6, 7, 8, 9)


# --- sources ----------------------------------------------------------------------------------


def _patient_study(ds: pydicom.Dataset) -> None:
    ds.PatientName = "Phantom^Head"
    ds.PatientID = "PH0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20240506"
    ds.StudyTime = "070000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD W/O CONTRAST"


def ct_headers(n: int = 4) -> list[pydicom.Dataset]:
    """Headers of an axial head CT series: patient, study, series, frame of reference, plane."""
    out = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1003.{i + 1}"
        _patient_study(ds)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = CT_SERIES_UID
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Head 5mm"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1004"
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Phantom Works"
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.48828125, 0.48828125]
        ds.SliceThickness = 5.0
        ds.Rows = 512
        ds.Columns = 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
        out.append(ds)
    return out


def wsi_header() -> pydicom.Dataset:
    """One TILED_FULL level of a VL Whole Slide Microscopy image, with specimen and container."""
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = WSI_IMAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2003.1"
    _patient_study(ds)
    ds.StudyDescription = "Lymph node biopsy"
    ds.Modality = "SM"
    ds.SeriesInstanceUID = WSI_SERIES_UID
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2004"
    ds.Manufacturer = "Phantom Works"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = 256
    ds.Columns = 256
    ds.NumberOfFrames = 64
    ds.TotalPixelMatrixColumns = 2048
    ds.TotalPixelMatrixRows = 2048
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ContainerIdentifier = "SLIDE-1"
    spec = pydicom.Dataset()
    spec.SpecimenIdentifier = "SPEC-1"
    spec.SpecimenUID = "1.2.826.0.1.3680043.8.498.2005"
    ds.SpecimenDescriptionSequence = [spec]
    return ds


def _card(task: str, finding: dict, site: dict | None):
    ct = task == "ct-slices"
    data = {
        "name": "ich_ct" if ct else "tumor_wsi", "version": "1.0.0", "task": task,
        "intended_use": "research", "sha256": "0" * 64,
        "input": {"name": "input", "layout": "NCHW", "shape": [-1, 9, 256, 256] if ct else [-1, 3, 224, 224]},
        "output": {"name": "prob", "activation": "sigmoid", "classes": ["negative", "positive"]},
        "selector": {"modality": ["CT"] if ct else ["SM"]},
        "preprocessing": ({"windows": [[40, 80], [80, 200], [600, 2800]], "context_slices": 1, "size": 256}
                          if ct else {"spacing_um": 0.5, "tile_size": 224}),
        "postprocessing": {"aggregation": "max" if ct else "top3_mean", "threshold": 0.5},
        "finding": {"code": finding, **({"site": site} if site else {})},
    }
    return parse_card(data, Path(f"models/{data['name']}"))


@pytest.fixture
def ich_card():
    return _card("ct-slices", {"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"},
                 {"value": "12738006", "scheme": "SCT", "meaning": "Brain"})


@pytest.fixture
def tumor_card():
    return _card("wsi-tiles", {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}, None)


def _present_result(headers, score=0.93):
    keys = tuple(KeyImage(h.SOPClassUID, h.SOPInstanceUID, s) for h, s in zip(headers[1:3], (0.93, 0.71)))
    return AnalysisResult.verdict(score, 0.5, key_images=keys)


def _uids(series=CT_SERIES_UID, key="ich_ct@1.0.0", run=1):
    return result_uids(series, key, run)


# --- validators -------------------------------------------------------------------------------


def write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.file_meta = ds.get("file_meta") or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def pixelmed_report(path: Path) -> tuple[list[str], list[str]]:
    proc = subprocess.run(
        ["java", *PIXELMED_FLAGS, "-cp", str(PIXELMED_JAR), "com.pixelmed.validate.DicomSRValidator",
         "-checkcontentitemorder", "-checktemplateid", str(path)],
        capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed")
needs_pixelmed = pytest.mark.skipif(shutil.which("java") is None or not PIXELMED_JAR.is_file(),
                                    reason="java or libpixelmed-java not installed")


# --- UIDs -------------------------------------------------------------------------------------


def test_result_uids_are_deterministic_valid_and_distinct_per_run_model_and_series():
    a = result_uids(CT_SERIES_UID, "ich_ct@1.0.0", 1)
    assert a == result_uids(CT_SERIES_UID, "ich_ct@1.0.0", 1)
    others = [result_uids(CT_SERIES_UID, "ich_ct@1.0.0", 2), result_uids(CT_SERIES_UID, "ich_ct@1.0.1", 1),
              result_uids(WSI_SERIES_UID, "ich_ct@1.0.0", 1)]
    fields = ("series_uid", "sr_sop_uid", "seg_sop_uid", "seg_series_uid", "tracking_uid")
    mine = [getattr(a, f) for f in fields]
    assert len(set(mine)) == len(mine)
    for uid in mine:
        assert is_valid_uid(uid) and uid.startswith("2.25.") and len(uid) <= 64
    for other in others:
        assert not set(mine) & {getattr(other, f) for f in fields}
    assert device_uid("ich_ct@1.0.0") == device_uid("ich_ct@1.0.0") != device_uid("ich_ct@1.0.1")
    with pytest.raises(ValueError, match="run"):
        result_uids(CT_SERIES_UID, "ich_ct@1.0.0", -1)


def test_same_run_gives_same_sr_uids_whatever_the_date(ich_card):
    headers = ct_headers()
    result = _present_result(headers)
    a = build_result_sr(ich_card, result, headers, _uids(run=2), 2, content_datetime=WHEN)
    b = build_result_sr(ich_card, result, headers, _uids(run=2), 2)
    c = build_result_sr(ich_card, result, headers, _uids(run=3), 3)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.SeriesDescription == "AI: ich_ct 1.0.0 (run 2)"
    tracking = [read_result_sr(x)["tracking_uid"] for x in (a, b, c)]
    assert tracking[0] == tracking[1] != tracking[2]


def test_a_later_run_names_the_sr_it_supersedes(ich_card):
    headers = ct_headers()
    first = build_result_sr(ich_card, _present_result(headers), headers, _uids(run=1), 1)
    second = build_result_sr(ich_card, AnalysisResult.verdict(0.08, 0.5), headers, _uids(run=2), 2,
                             supersedes=_uids(run=1))
    assert "PredecessorDocumentsSequence" not in first
    [study] = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == STUDY_UID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    [sop] = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (COMPREHENSIVE_3D_SR,
                                                                         first.SOPInstanceUID)


# --- content round trip -----------------------------------------------------------------------


def test_bleed_comes_back_as_present_sr_with_certainty_algorithm_and_key_images(ich_card):
    headers = ct_headers()
    result = _present_result(headers, score=0.93)
    ds = build_result_sr(ich_card, result, headers, _uids(), 1, content_datetime=WHEN)

    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == STUDY_UID and ds.SeriesInstanceUID != CT_SERIES_UID
    assert (ds.PatientID, ds.AccessionNumber) == ("PH0001", "ACC0001")
    flags = (ds.PreliminaryFlag, ds.VerificationFlag, ds.CompletionFlag)
    assert flags == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    assert ds.Manufacturer == "befund"
    algo = [e for e in ds.ContributingEquipmentSequence
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    assert len(algo) == 1
    assert algo[0].PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert (algo[0].ManufacturerModelName, algo[0].SoftwareVersions) == ("ich_ct", "1.0.0")
    assert algo[0].DeviceUID == device_uid("ich_ct@1.0.0")

    r = read_result_sr(ds)
    assert r["finding"] == {"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"}
    assert r["finding_site"]["value"] == "12738006"
    assert r["present"] is True and r["verdict"] == "present" and r["analysed"] is True
    assert r["certainty"] == pytest.approx(0.93)
    assert r["algorithm"] == {"name": "ich_ct", "version": "1.0.0",
                              "parameters": ["threshold=0.5", "aggregation=max"]}
    assert r["referenced_sop_instance_uids"] == [headers[1].SOPInstanceUID, headers[2].SOPInstanceUID]
    assert [x["sop_instance_uid"] for x in r["image_library"]] == r["referenced_sop_instance_uids"]
    assert r["not_analysed_reason"] is None
    assert "Intracranial hemorrhage present (certainty 93%)" in r["summary"]
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == CT_SERIES_UID and len(evidence.ReferencedSOPSequence) == len(headers)


def test_clean_head_comes_back_as_absent_sr(ich_card):
    headers = ct_headers()
    ds = build_result_sr(ich_card, AnalysisResult.verdict(0.08, 0.5), headers, _uids(), 1)
    r = read_result_sr(ds)
    assert r["present"] is False and r["verdict"] == "absent"
    assert r["certainty"] == pytest.approx(0.92)
    assert r["references"] == [] and r["image_library"] == []
    assert r["algorithm"]["name"] == "ich_ct"


def test_not_analysed_sr_says_so_with_the_reason(ich_card):
    headers = ct_headers(1)
    reason = f"series {CT_SERIES_UID}: 1 slice, the ICH model needs at least 16"
    ds = build_result_sr(ich_card, AnalysisResult.not_analysed(reason), headers, _uids(), 1)
    r = read_result_sr(ds)
    assert r["present"] is None and r["verdict"] == "indeterminate" and r["analysed"] is False
    assert r["not_analysed_reason"] == reason
    assert r["certainty"] is None
    assert r["summary"] == f"ich_ct 1.0.0: not analysed: {reason}"
    texts = [str(i.TextValue) for i in _walk(ds) if i.ValueType == "TEXT"]
    assert any(t.endswith(f"not analysed: {reason}") for t in texts)


def test_slide_result_references_frames_and_carries_tumor_area(tumor_card):
    slide = wsi_header()
    keys = (KeyImage(WSI_IMAGE, slide.SOPInstanceUID, 0.97, frame=12),
            KeyImage(WSI_IMAGE, slide.SOPInstanceUID, 0.95, frame=13))
    result = AnalysisResult.verdict(0.97, 0.5, key_images=keys, measurements={"tumor_area_mm2": 3.25,
                                                                              "tiles_scored": 812.0})
    ds = build_result_sr(tumor_card, result, [slide], _uids(WSI_SERIES_UID, "tumor_wsi@1.0.0"), 1)
    r = read_result_sr(ds)
    assert r["present"] is True and r["finding"]["value"] == "108369006"
    assert r["references"] == [{"sop_class_uid": WSI_IMAGE, "sop_instance_uid": slide.SOPInstanceUID,
                                "frames": [12, 13]}]
    area = {"value": "42798000", "scheme": "SCT", "meaning": "Area"}
    assert r["measurements"] == [{"name": "Area", "code": area, "value": 3.25, "unit": "mm2",
                                  "unit_meaning": "square millimeter"}]
    assert r["algorithm"]["parameters"] == ["threshold=0.5", "aggregation=top3_mean"]
    procedure = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == dc.IMAGING_PROCEDURE.value


def test_key_image_missing_from_headers_is_refused_with_a_clear_message(ich_card):
    headers = ct_headers()
    result = _present_result(headers)
    with pytest.raises(ValueError, match="not among the source headers"):
        build_result_sr(ich_card, result, headers[:1], _uids(), 1)


def test_reader_accepts_a_peer_style_evaluation_and_fractional_certainty(ich_card):
    ds = build_result_sr(ich_card, _present_result(ct_headers()), ct_headers(), _uids(), 1)
    group = next(i for i in _walk(ds) if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue
                 == dc.MEASUREMENT_GROUP.value)
    for item in group.ContentSequence:
        if item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeValue == dc.PRESENT.value:
            item.ConceptNameCodeSequence[0].CodeValue = "1386000"  # peer: "ICH = Present"
            item.ConceptNameCodeSequence[0].CodingSchemeDesignator = "SCT"
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == dc.FINDING.value:
            group.ContentSequence.remove(item)
    for item in _walk(group):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111012":
            mv = item.MeasuredValueSequence[0]
            mv.NumericValue = "0.93"
            mv.MeasurementUnitsCodeSequence[0].CodeValue = "1"
    r = read_result_sr(ds)
    assert r["finding"]["value"] == "1386000" and r["present"] is True
    assert r["certainty"] == pytest.approx(0.93)


def _walk(item):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)


# --- validators -------------------------------------------------------------------------------


def _all_srs(ich_card, tumor_card):
    headers = ct_headers()
    slide = wsi_header()
    slide_keys = (KeyImage(WSI_IMAGE, slide.SOPInstanceUID, 0.97, frame=12),)
    return {
        "present": build_result_sr(ich_card, _present_result(headers), headers, _uids(), 1),
        "absent": build_result_sr(ich_card, AnalysisResult.verdict(0.08, 0.5), headers, _uids(run=2), 2,
                                  supersedes=_uids(run=1)),
        "not_analysed": build_result_sr(ich_card, AnalysisResult.not_analysed("1 slice, needs 16"),
                                        headers[:1], _uids(run=3), 3, supersedes=_uids(run=2)),
        "slide": build_result_sr(tumor_card, AnalysisResult.verdict(0.97, 0.5, key_images=slide_keys,
                                                                    measurements={"tumor_area_mm2": 3.25}),
                                 [slide], _uids(WSI_SERIES_UID, "tumor_wsi@1.0.0"), 1),
    }


@needs_dciodvfy
def test_dciodvfy_finds_no_errors(ich_card, tumor_card, tmp_path):
    for name, ds in _all_srs(ich_card, tumor_card).items():
        errors, _ = dciodvfy_errors(write(ds, tmp_path / f"{name}.dcm"))
        assert errors == [], f"{name}: {errors}"


@needs_dsrdump
def test_dsrdump_parses_the_sr(ich_card, tumor_card, tmp_path):
    for name, ds in _all_srs(ich_card, tumor_card).items():
        path = write(ds, tmp_path / f"{name}.dcm")
        proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert "Imaging Measurement Report" in proc.stdout
        assert not [ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "F:"))], proc.stderr
    assert "not analysed: 1 slice, needs 16" in subprocess.run(
        ["dsrdump", "+Pl", str(tmp_path / "not_analysed.dcm")], capture_output=True, text=True).stdout


@needs_pixelmed
def test_pixelmed_sr_validator_finds_no_errors(ich_card, tumor_card, tmp_path):
    """PixelMed (the IHE Connectathon SR validator), with its strict order and template checks.

    It takes 15-40 s per file on a busy 2-core machine, so the absent SR (a subset of the
    present one: no references, no library) is left out and two JVMs run side by side.
    """
    srs = _all_srs(ich_card, tumor_card)
    names = ("present", "not_analysed", "slide")
    paths = {name: write(srs[name], tmp_path / f"{name}.dcm") for name in names}
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = dict(zip(paths, pool.map(pixelmed_report, paths.values())))
    for name, (errors, warnings) in reports.items():
        assert errors == [], f"{name}: {errors}"
        assert warnings == [], f"{name}: {warnings}"


@needs_dciodvfy
def test_sr_from_a_deidentified_source_without_a_method_passes_dciodvfy(ich_card, tmp_path):
    """As the GE head CT was de-identified: PatientIdentityRemoved YES, DeidentificationMethod
    empty (type 1C then). The SR keeps YES, says the method was not stated, and stays valid."""
    headers = ct_headers(2)
    for h in headers:
        h.PatientIdentityRemoved = "YES"
        h.DeidentificationMethod = ""
    for result in (AnalysisResult.verdict(0.08, 0.5), AnalysisResult.not_analysed("slices too thick")):
        ds = build_result_sr(ich_card, result, headers, _uids(), 1)
        assert ds.PatientIdentityRemoved == "YES" and "not stated" in ds.DeidentificationMethod
        errors, _ = dciodvfy_errors(write(ds, tmp_path / "deidentified.dcm"))
        assert errors == []
    assert headers[0].DeidentificationMethod == ""  # the source header is not changed
