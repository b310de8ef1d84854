"""Encode an AnalysisResult as an IHE AI Results (AIR) Comprehensive 3D SR.

Document tree (PS3.16 TID 1500 "Measurement Report"):

    CONTAINER Imaging Measurement Report (TID 1500)
      HAS CONCEPT MOD  Language of Content (TID 1204)
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model
                       (+ Specimen subject context for slides)
      HAS CONCEPT MOD  Procedure reported = (25045-6, LN) for CT, (363679005, SCT) for slides
      CONTAINS         Image Library (TID 1600): the key images only
      CONTAINS         Imaging Measurements
        CONTAINS       Measurement Group (TID 1501), one per finding
          Tracking Identifier / Tracking UID (TID 4108, deterministic)
          Finding = the card's finding code;   Finding Site = the card's site
          Algorithm Name / Version / Parameters (TID 4019)
          Certainty of Finding (NUM, %, 0..100; TID 300)   [analysed only]
          Area (mm2) and other coded measurements           [when the pipeline gives them]
          Finding = Present | Absent | Indeterminate        (qualitative evaluation)
          Source of Measurement -> key images (with frame numbers for multi-frame images)
        (or, for a segmentation, a Volumetric ROI group, TID 1411: the same rows less the
         key images, plus the SEG segment the measurements were made on, as its region)
      CONTAINS         Qualitative Evaluations (TID 1500 row 12, added by hand)
        CODE <finding> = Present | Absent | Indeterminate
        TEXT Comment = one line a radiologist reads: "ich_ct 1.0.0: Intracranial hemorrhage
                       present (certainty 93.1%)" or "ich_ct 1.0.0: not analysed: <reason>"
                       (TID 1501 has no TEXT row, so the reason lives here, TID 1500 row 14)

Certainty of Finding is "the probability of the stated verdict" (AnalysisResult.certainty)
on the 0..100 percent scale of PS3.16's CAD templates; `sr_reading` turns it back into 0..1.

The SR sits in a new series of the source's study, with UIDs from `result_uids`: the same
(series, model, run) gives the same UIDs, whatever the content date. A later run of the same
series and model (late instances, a new version of an instance, a run asked for again)
supersedes the earlier one: its SR names the earlier SR in the Predecessor Documents Sequence
(0040,A360) of the SR Document General module, so a PACS or viewer following IHE AIR shows the
newer result and keeps the older one as history.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SubjectContext,
    SubjectContextSpecimen,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage

from pipelines import dicom_codes as dc
from pipelines.findings import AnalysisResult, KeyImage
from pipelines.model_card import ModelCard
from pipelines.patient_module import with_valid_patient_module
from pipelines.result_uids import ResultUids, device_uid

log = logging.getLogger(__name__)

MANUFACTURER = "befund"
SERIES_NUMBER_BASE = 9000  # result series are numbered 9000 + run, away from acquired series
CERTAINTY_DECIMALS = 2  # percent, so 0.01 % resolution
NOT_ANALYSED = "not analysed"

CONTAINS = RelationshipTypeValues.CONTAINS

# Type 2 attributes highdicom copies from the first source header; a peer's header may lack
# them, and an empty value is what the standard asks for then.
_PATIENT_STUDY_TYPE2 = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def _software_version() -> str:
    try:
        return version("befund")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


# --- typed parts that check their inputs ------------------------------------------------------


@dataclass(frozen=True)
class ImageReference:
    """One referenced image and, for multi-frame images, the 1-based frame numbers."""

    sop_class_uid: str
    sop_instance_uid: str
    frames: tuple[int, ...] = ()

    @classmethod
    def group(cls, key_images: Sequence[KeyImage]) -> list[ImageReference]:
        """Merge key images per SOP instance, keeping first-seen order; frames are 1-based."""
        order: list[str] = []
        classes: dict[str, str] = {}
        frames: dict[str, list[int]] = {}
        for k in key_images:
            if k.sop_instance_uid not in classes:
                order.append(k.sop_instance_uid)
                classes[k.sop_instance_uid] = k.sop_class_uid
                frames[k.sop_instance_uid] = []
            if k.frame is not None:
                if k.frame < 1:
                    raise ValueError(
                        f"key image {k.sop_instance_uid}: frame {k.frame} is not a DICOM frame "
                        "number; KeyImage.frame is 1-based (Referenced Frame Number)")
                if k.frame not in frames[k.sop_instance_uid]:
                    frames[k.sop_instance_uid].append(k.frame)
        return [cls(classes[u], u, tuple(frames[u])) for u in order]

    def content_item(self) -> SourceImageForMeasurementGroup:
        return SourceImageForMeasurementGroup(
            referenced_sop_class_uid=self.sop_class_uid,
            referenced_sop_instance_uid=self.sop_instance_uid,
            referenced_frame_numbers=list(self.frames) or None,
        )


@dataclass(frozen=True)
class Verdict:
    """The qualitative evaluation of one finding and what a reader needs to trust it."""

    finding: Code
    value: Code  # PRESENT, ABSENT or INDETERMINATE
    certainty_percent: float | None
    reason: str = ""

    @classmethod
    def of(cls, finding: Code, result: AnalysisResult) -> Verdict:
        if not result.analysed:
            return cls(finding, dc.INDETERMINATE, None, result.reason.strip())
        value = dc.PRESENT if result.present else dc.ABSENT
        percent = None
        if result.certainty is not None:
            percent = round(100.0 * float(result.certainty), CERTAINTY_DECIMALS)
        return cls(finding, value, percent)

    @property
    def analysed(self) -> bool:
        return self.value is not dc.INDETERMINATE

    def summary(self, card: ModelCard) -> str:
        who = f"{card.name} {card.version}"
        if not self.analysed:
            return f"{who}: {NOT_ANALYSED}: {self.reason}"
        word = "present" if self.value is dc.PRESENT else "absent"
        tail = f" (certainty {self.certainty_percent:g}%)" if self.certainty_percent is not None else ""
        return f"{who}: {self.finding.meaning} {word}{tail}"


def algorithm_parameters(card: ModelCard, result: AnalysisResult) -> list[str]:
    """TID 4019 Algorithm Parameters: what decides the verdict, as 'key=value' strings."""
    threshold = result.threshold if result.threshold is not None else card.postprocessing.threshold
    parameters = [f"threshold={threshold:g}", f"aggregation={card.postprocessing.aggregation}"]
    if result.threshold_source:  # a site's operating point, not the card's threshold
        parameters.append(f"threshold_source={result.threshold_source}")
    return parameters


def measurements_of(result: AnalysisResult) -> list[Measurement]:
    """TID 300 numeric measurements: Certainty of Finding plus the coded ones in dc.MEASUREMENTS."""
    out = []
    for key, value in sorted(result.measurements.items()):
        if key not in dc.MEASUREMENTS or value is None:
            continue
        name, unit = dc.MEASUREMENTS[key]
        out.append(Measurement(name=name, value=float(value), unit=unit))
    return out


# --- the document -----------------------------------------------------------------------------


def build_result_sr(
    card: ModelCard,
    result: AnalysisResult,
    source_headers: Sequence[pydicom.Dataset],
    uids: ResultUids,
    run: int,
    *,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    supersedes: ResultUids | None = None,
    segment: hd.sr.ReferencedSegment | None = None,
) -> pydicom.Dataset:
    """The AIR Comprehensive 3D SR for one model's result on one series (or slide).

    `source_headers` are instance headers of the analysed series (pixel data not needed); they
    must include every key image. The SR joins the source's study in a new series.
    `supersedes`: the result UIDs of the earlier run of the same series and model, whose SR
    this one replaces (Predecessor Documents Sequence).
    `segment`: the SEG segment the finding's measurements were made on; the group is then a
    TID 1411 Volumetric ROI group with it as its region, instead of TID 1501.
    """
    headers = _checked_headers(source_headers)
    by_uid = {h.SOPInstanceUID: h for h in headers}
    refs = ImageReference.group(result.key_images)
    missing = [r.sop_instance_uid for r in refs if r.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(
            f"series {headers[0].SeriesInstanceUID}: key image(s) {', '.join(missing)} are not among "
            "the source headers given to build_result_sr; pass their headers too")
    for r in refs:
        if r.frames and int(by_uid[r.sop_instance_uid].get("NumberOfFrames", 1) or 1) < max(r.frames):
            raise ValueError(f"key image {r.sop_instance_uid}: frame {max(r.frames)} does not exist")

    finding = dc.from_card(card.finding.code)
    verdict = Verdict.of(finding, result)
    group = _measurement_group(card, result, verdict, refs, uids, segment)
    report = MeasurementReport(
        observation_context=_observation_context(card, headers[0]),
        procedure_reported=dc.PROCEDURE_BY_MODALITY.get(str(headers[0].get("Modality", "")),
                                                        dc.IMAGING_PROCEDURE),
        imaging_measurements=[group],
        title=dc.IMAGING_MEASUREMENT_REPORT,
    )
    root = report[0]
    if refs:
        # TID 1500 row 5 goes before Imaging Measurements (row 6), the last item so far.
        root.ContentSequence.insert(len(root.ContentSequence) - 1,
                                    _image_library([by_uid[r.sop_instance_uid] for r in refs]))
    root.ContentSequence.append(_study_qualitative_evaluations(card, verdict))

    when = content_datetime or datetime.now()
    evidence = _evidence(headers)
    if segment is not None:  # the SEG is built after the SR: name it in the evidence by its UIDs
        evidence.append(_segmentation_evidence(headers[0].StudyInstanceUID, uids))
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_uid,
        series_number=SERIES_NUMBER_BASE + run,
        sop_instance_uid=uids.sr_sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=_series_description(card, run),
        manufacturer_model_name=MANUFACTURER,
        software_versions=_software_version(),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        previous_versions=_predecessors(headers[0].StudyInstanceUID, supersedes),
    )
    sr.ContributingEquipmentSequence.append(_algorithm_equipment(card, when))
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    log.info("encoded SR %s for series %s model %s run %d: %s", uids.sr_sop_uid,
             headers[0].SeriesInstanceUID, card.key, run, verdict.value.meaning)
    return sr


def _predecessors(study_uid: str, supersedes: ResultUids | None) -> list[pydicom.Dataset] | None:
    """The earlier SR as highdicom takes a previous version (it builds the sequence item)."""
    if supersedes is None:
        return None
    earlier = pydicom.Dataset()
    earlier.StudyInstanceUID = study_uid  # results join the source's study: so did the earlier SR
    earlier.SeriesInstanceUID = supersedes.series_uid
    earlier.SOPClassUID = Comprehensive3DSRStorage
    earlier.SOPInstanceUID = supersedes.sr_sop_uid
    return [earlier]


def _series_description(card: ModelCard, run: int) -> str:
    return f"AI: {card.name} {card.version} (run {run})"[:64]


def _checked_headers(source_headers: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    headers = list(source_headers)
    if not headers:
        raise ValueError("build_result_sr needs at least one source header (the analysed series)")
    for h in headers:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not h.get(kw):
                raise ValueError(f"a source header lacks {kw}; cannot reference it in the SR")
    studies = {h.StudyInstanceUID for h in headers}
    if len(studies) > 1:
        raise ValueError(f"source headers span {len(studies)} studies; an SR reports on one study")
    return headers


def _evidence(headers: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Headers as highdicom needs them: type 2 patient/study attributes present (maybe empty),
    de-identification attributes valid (`patient_module`)."""
    first = copy.copy(with_valid_patient_module(headers[0]))
    for kw in _PATIENT_STUDY_TYPE2:
        if kw not in first:
            setattr(first, kw, None)
    return [first, *headers[1:]]


def _segmentation_evidence(study_uid: str, uids: ResultUids) -> pydicom.Dataset:
    """What the Current Requested Procedure Evidence Sequence needs of the result's own SEG."""
    seg = pydicom.Dataset()
    seg.StudyInstanceUID = study_uid
    seg.SeriesInstanceUID = uids.seg_series_uid
    seg.SOPClassUID = SegmentationStorage
    seg.SOPInstanceUID = uids.seg_sop_uid
    return seg


def _observation_context(card: ModelCard, header: pydicom.Dataset) -> ObservationContext:
    device = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(card.key),
            name=card.name[:64],
            manufacturer_name=card.manufacturer[:64],
            model_name=f"{card.name} {card.version}"[:64],
        ),
    )
    return ObservationContext(observer_device_context=device, subject_context=_specimen_context(header))


def _specimen_context(header: pydicom.Dataset) -> SubjectContext | None:
    """TID 1009 specimen subject context for slide images (the subject is a specimen)."""
    if header.get("Modality") != "SM" or not header.get("SpecimenDescriptionSequence"):
        return None
    spec = header.SpecimenDescriptionSequence[0]
    if not (spec.get("SpecimenUID") and spec.get("SpecimenIdentifier") and header.get("ContainerIdentifier")):
        return None
    return SubjectContext(
        subject_class=codes.DCM.Specimen,
        subject_class_specific_context=SubjectContextSpecimen(
            uid=spec.SpecimenUID,
            identifier=spec.SpecimenIdentifier,
            container_identifier=header.ContainerIdentifier,
        ),
    )


def _measurement_group(card: ModelCard, result: AnalysisResult, verdict: Verdict,
                       refs: list[ImageReference], uids: ResultUids,
                       segment: hd.sr.ReferencedSegment | None = None) -> hd.sr.templates.Template:
    measurements = []
    if verdict.certainty_percent is not None:
        measurements.append(Measurement(name=dc.CERTAINTY_OF_FINDING, value=verdict.certainty_percent,
                                        unit=dc.PERCENT))
    if verdict.analysed:
        measurements.extend(measurements_of(result))
    site = card.finding.site
    if segment is not None:  # TID 1411: the measurements are of the referenced SEG segment
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uids.tracking_uid, identifier=f"{card.name}: {verdict.finding.meaning}"[:64]),
            referenced_segment=segment,
            finding_type=verdict.finding,
            finding_sites=[FindingSite(dc.from_card(site))] if site else None,
            algorithm_id=AlgorithmIdentification(
                name=card.name, version=card.version, parameters=algorithm_parameters(card, result)),
            measurements=measurements or None,
            qualitative_evaluations=[QualitativeEvaluation(dc.FINDING, verdict.value)],
        )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.tracking_uid, identifier=f"{card.name}: {verdict.finding.meaning}"[:64]),
        finding_type=verdict.finding,
        finding_sites=[FindingSite(dc.from_card(site))] if site else None,
        algorithm_id=AlgorithmIdentification(
            name=card.name, version=card.version, parameters=algorithm_parameters(card, result)),
        measurements=measurements or None,
        qualitative_evaluations=[QualitativeEvaluation(dc.FINDING, verdict.value)],
        source_images=[r.content_item() for r in refs] or None,
    )
    return group


def _image_library(images: list[pydicom.Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library with one group holding the referenced images (TID 1601/1602)."""
    entries = []
    for image in images:
        item = ImageContentItem(name=dc.SOURCE, referenced_sop_class_uid=image.SOPClassUID,
                                referenced_sop_instance_uid=image.SOPInstanceUID, relationship_type=CONTAINS)
        descriptors = _descriptors(image)
        if descriptors:
            item.ContentSequence = descriptors
        entries.append(item)
    group = ContainerContentItem(name=dc.IMAGE_LIBRARY_GROUP, relationship_type=CONTAINS)
    group.ContentSequence = ContentSequence(entries)
    library = ContainerContentItem(name=dc.IMAGE_LIBRARY, relationship_type=CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def _descriptors(image: pydicom.Dataset) -> ImageLibraryEntryDescriptors | None:
    """Full descriptors where the header has them; modality, frame of reference and size if not."""
    try:
        return ImageLibraryEntryDescriptors(image)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        log.info("image %s: reduced library descriptors (%s)", image.SOPInstanceUID, exc)
    reduced = pydicom.Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if kw in image:
            setattr(reduced, kw, image[kw].value)
    reduced.Modality = "OT"  # not cross-sectional: no geometry descriptors are asked for
    try:
        return ImageLibraryEntryDescriptors(reduced)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None


def _study_qualitative_evaluations(card: ModelCard, verdict: Verdict) -> ContainerContentItem:
    """TID 1500 row 12-14: the study-level verdict (CODE) and one line for people (TEXT)."""
    container = ContainerContentItem(name=dc.QUALITATIVE_EVALUATIONS, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence([
        CodeContentItem(name=verdict.finding, value=verdict.value, relationship_type=CONTAINS),
        TextContentItem(name=dc.COMMENT, value=verdict.summary(card), relationship_type=CONTAINS),
    ])
    return container


def _algorithm_equipment(card: ModelCard, when: datetime) -> pydicom.Dataset:
    """IHE AIR: a Contributing Equipment item per algorithm, purpose "Processing Algorithm"."""
    item = pydicom.Dataset()
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(dc.PROCESSING_ALGORITHM)]
    item.Manufacturer = card.manufacturer[:64]
    item.ManufacturerModelName = card.name[:64]
    item.SoftwareVersions = card.version[:64]
    item.DeviceUID = device_uid(card.key)
    item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = f"AI model {card.key}"[:1024]
    return item
