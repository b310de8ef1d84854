"""A CT segmentation result as a BINARY DICOM Segmentation over its source slices (highdicom).

One segment (the card's finding, e.g. "Intracranial hemorrhage", category "Morphologically
abnormal structure", site from the card), one frame per source slice that holds any of it, on
the source matrix: each frame shares its slice's position, orientation and pixel spacing and
references it (Derivation Image Sequence), so a viewer overlays it on the CT without
resampling. Slices without a segmented voxel are left out (a frame of zeros tells nothing and
a 300-slice head would carry 300 of them). The SEG joins the source's study and frame of
reference; UIDs come in as arguments so a retry produces the same object.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from pipelines.ct_volume import runs_to_mask
from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard
from pipelines.patient_module import with_valid_patient_module
from pipelines.seg_encoding import MORPHOLOGICALLY_ABNORMAL, result_seg_identity

SEG_SERIES_NUMBER = 9200  # above the SR (9000 + run) and slide heatmap (9100) series
SEGMENT_NUMBER = 1
MAX_SEG_SLICES = 2000  # a result naming more slices than any CT series we take is refused


def segmented_slices(result: AnalysisResult) -> list[str]:
    """SOP instance UIDs of the slices the result's masks cover, in stack order."""
    seg = result.segmentation or {}
    slices = seg.get("slices") or []
    if len(slices) > MAX_SEG_SLICES:
        raise ValueError(f"segmentation names {len(slices)} slices; at most {MAX_SEG_SLICES} are taken")
    return [str(s["sop_instance_uid"]) for s in slices]


def _masks(result: AnalysisResult) -> list[tuple[str, np.ndarray]]:
    seg = result.segmentation or {}
    try:
        rows, columns = int(seg["rows"]), int(seg["columns"])
        return [(str(s["sop_instance_uid"]), runs_to_mask(s["runs"], rows, columns))
                for s in seg["slices"][:MAX_SEG_SLICES]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"result segmentation is incomplete: {exc}") from exc


def segment_description(card: ModelCard) -> hd.seg.SegmentDescription:
    finding = card.finding
    return hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=finding.code.meaning[:64],
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL,
        segmented_property_type=hd.sr.CodedConcept(finding.code.value, finding.code.scheme,
                                                   finding.code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=card.name, family=codes.cid7162.ArtificialIntelligence, version=card.version),
        anatomic_regions=([hd.sr.CodedConcept(finding.site.value, finding.site.scheme, finding.site.meaning)]
                          if finding.site else None),
    )


def build_mask_seg(card: ModelCard, result: AnalysisResult, source_headers: Sequence[pydicom.Dataset],
                   seg_series_uid: str, seg_sop_uid: str, run: int) -> pydicom.Dataset:
    """BINARY Segmentation of the result's masks; `source_headers` must hold every segmented
    slice (headers only, pixel data not needed)."""
    masks = _masks(result)
    if not result.analysed or not masks:
        raise ValueError("only an analysed result with a segmented voxel has a segmentation")
    by_uid = {str(h.SOPInstanceUID): h for h in source_headers}
    missing = [uid for uid, _ in masks if uid not in by_uid]
    if missing:
        raise ValueError(f"segmented slice {missing[0]} is not among the {len(by_uid)} source headers")
    sources = []
    for i, (uid, mask) in enumerate(masks):
        header = by_uid[uid]
        if mask.shape != (int(header.Rows), int(header.Columns)):
            raise ValueError(f"mask of slice {uid} is {mask.shape}, "
                             f"the slice {header.Rows} x {header.Columns}")
        # highdicom copies patient and study attributes from the first source; make them valid
        sources.append(with_valid_patient_module(copy.copy(header)) if i == 0 else header)
    pixels = np.stack([m for _, m in masks]).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(card)],
        **result_seg_identity(card, seg_series_uid, SEG_SERIES_NUMBER, seg_sop_uid, run),
        content_description=f"{card.name} {card.version} segmentation (run {run})"[:64],
        content_label="SEGMENTATION",
    )
    seg.SeriesDescription = f"AI: {card.name} {card.version} segmentation (preliminary)"[:64]
    return seg
