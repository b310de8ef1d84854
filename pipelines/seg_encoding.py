"""The slide heatmap as a FRACTIONAL DICOM Segmentation at tile-grid resolution (highdicom).

One segment ("Tumor probability"), one pixel per model tile: pixel spacing = tile size x the
read level's spacing, positioned in the slide coordinate system at the source's total pixel
matrix origin, tiled as highdicom does for whole-slide segmentations (TotalPixelMatrix*
attributes, TILED_FULL). Pixels outside tissue are 0. It references the slide level the tiles
were read from and shares its study and frame of reference; UIDs come in as arguments so a
retry produces the same object. Attributes converters often omit (the pixel matrix origin,
the slide orientation, container and specimen) take `wsi_slide.SLIDE_DEFAULTS`, and an odd
source patient module is made valid (`patient_module`), so encoding never fails on them.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard
from pipelines.patient_module import with_valid_patient_module
from pipelines.wsi_slide import with_slide_defaults

log = logging.getLogger(__name__)

MORPHOLOGICALLY_ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
SEG_SERIES_NUMBER = 9100  # above the SR series numbers; a run is told apart by InstanceNumber


def _heatmap_array(result: AnalysisResult) -> np.ndarray:
    hm = result.heatmap or {}
    try:
        rows, cols = int(hm["rows"]), int(hm["cols"])
        values = np.array([np.nan if v is None else float(v) for v in hm["values"]], np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"result heatmap is incomplete: {exc}") from exc
    if values.size != rows * cols:
        raise ValueError(f"heatmap has {values.size} values for a {rows} x {cols} grid")
    grid = values.reshape(rows, cols)
    return np.clip(np.where(np.isfinite(grid) & (grid >= 0), grid, 0.0), 0.0, 1.0)


def _origin(slide_header: pydicom.Dataset) -> tuple[float, float, float]:
    origin = slide_header.TotalPixelMatrixOriginSequence[0]
    return (float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem),
            float(origin.get("ZOffsetInSlideCoordinateSystem", 0.0)))


def result_seg_identity(card: ModelCard, series_uid: str, series_number: int, sop_uid: str,
                        run: int) -> dict:
    """The arguments of hd.seg.Segmentation every result SEG shares: its UIDs (deterministic per
    series, model version and run) and the model as the device that made it."""
    return dict(series_instance_uid=series_uid, series_number=series_number, sop_instance_uid=sop_uid,
                instance_number=max(int(run), 1), manufacturer=card.manufacturer,
                manufacturer_model_name=card.name, software_versions=card.version,
                device_serial_number=card.key)


def build_heatmap_seg(card: ModelCard, result: AnalysisResult, slide_header: pydicom.Dataset,
                      seg_series_uid: str, seg_sop_uid: str, run: int) -> pydicom.Dataset:
    """FRACTIONAL (probability) Segmentation of the result's heatmap over `slide_header`'s level."""
    if not result.analysed or not result.heatmap:
        raise ValueError("only an analysed slide result with a heatmap has a segmentation")
    hm = result.heatmap
    if str(slide_header.SOPInstanceUID) != hm.get("level_sop_instance_uid", slide_header.SOPInstanceUID):
        raise ValueError(f"heatmap was read from {hm.get('level_sop_instance_uid')}, "
                         f"not from {slide_header.SOPInstanceUID}")
    grid = _heatmap_array(result)
    slide_header, filled = with_slide_defaults(with_valid_patient_module(slide_header))
    if filled:
        log.info("slide %s: SEG uses documented defaults for %s", slide_header.SOPInstanceUID,
                 ", ".join(filled))
    spacing_mm = float(hm["tile_size_px"]) * float(hm["spacing_um"]) / 1000.0

    algorithm = hd.AlgorithmIdentificationSequence(
        name=card.name, family=codes.cid7162.ArtificialIntelligence, version=card.version)
    finding = card.finding
    anatomic = ([hd.sr.CodedConcept(finding.site.value, finding.site.scheme, finding.site.meaning)]
                if finding.site else None)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"{finding.code.meaning} probability"[:64],
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL,
        segmented_property_type=hd.sr.CodedConcept(finding.code.value, finding.code.scheme,
                                                   finding.code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=anatomic,
    )
    orientation = [float(v) for v in slide_header.ImageOrientationSlide]
    tile = min(256, max(grid.shape))  # one frame for grids up to 256 tiles a side
    seg = hd.seg.Segmentation(
        source_images=[slide_header],
        pixel_array=grid[None, :, :, None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=[segment],
        **result_seg_identity(card, seg_series_uid, SEG_SERIES_NUMBER, seg_sop_uid, run),
        content_description=f"{card.name} {card.version} tile probabilities (run {run})"[:64],
        content_label="HEATMAP",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(spacing_mm, spacing_mm),
                                                slice_thickness=float(
                                                    slide_header.get("ImagedVolumeDepth", 0.001)) or 0.001),
        plane_orientation=hd.PlaneOrientationSequence(coordinate_system="SLIDE",
                                                      image_orientation=orientation),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="SLIDE",
                                                  image_position=_origin(slide_header),
                                                  pixel_matrix_position=(1, 1))],
        tile_pixel_array=True,
        tile_size=(tile, tile),
        omit_empty_frames=False,
    )
    seg.PatientOrientation = ""  # GeneralImage type 2C: slides have no patient orientation
    seg.SeriesDescription = f"{card.name} {card.version} heatmap (AI, preliminary)"[:64]
    return seg
