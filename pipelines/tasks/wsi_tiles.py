"""Task `wsi-tiles`: a whole-slide image scored tile by tile, one finding for the slide.

The analysis is pipelines/wsi_analysis.py (slide reading in wsi_slide.py, tissue detection in
tissue.py); this module is what the node needs besides: the card's `preprocessing` block
(spacing, tile size, normalisation, tissue detection), the FRACTIONAL heatmap SEG
(seg_encoding.py) over the level the tiles were read from, and the key image, the slide with
its tile probability map.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipelines.findings import AnalysisResult
from pipelines.model_card import CardError, CardFields, ModelCard, TensorSpec, WsiPreprocessing
from pipelines.result_uids import ResultUids
from pipelines.tasks import register
from pipelines.tasks.base import Infer, VerdictTask


class WsiTiles(VerdictTask):
    name = "wsi-tiles"
    tensor_endpoint = "infer_wsi"

    def parse_preprocessing(self, block: CardFields, tensor: TensorSpec,
                            input_where: str) -> WsiPreprocessing:
        p = block
        pre = WsiPreprocessing(
            spacing_um=p.req("spacing_um", float),
            tile_size=p.req("tile_size", int),
            overlap=p.opt("overlap", 0, int),
            mean=tuple(float(v) for v in p.opt("mean", [0, 0, 0], list)),
            std=tuple(float(v) for v in p.opt("std", [1, 1, 1], list)),
            tissue_saturation=p.opt("tissue_saturation", 7.0, float),
            tissue_min_fraction=p.opt("tissue_min_fraction", 0.0005, float),
            batch_size=p.opt("batch_size", 64, int),
        )
        if pre.spacing_um <= 0 or pre.tile_size <= 0:
            raise CardError(f"{p.where}: spacing_um and tile_size must be positive")
        return pre

    def analyse(self, card: ModelCard, paths: Sequence[str | Path], infer: Infer,
                executor: Executor | None = None) -> AnalysisResult:
        from pipelines.wsi_analysis import analyse_wsi_slide

        return analyse_wsi_slide(card, paths, infer, executor=executor)

    def referenced_instances(self, result: AnalysisResult) -> list[str]:
        """The key tiles' level and the level the heatmap was read from (the SEG's source)."""
        wanted = super().referenced_instances(result)
        if result.heatmap and result.heatmap.get("level_sop_instance_uid"):
            wanted.append(result.heatmap["level_sop_instance_uid"])
        return wanted

    def has_seg(self, card: ModelCard, result: AnalysisResult) -> bool:
        return bool(result.analysed and result.heatmap)

    def build_seg(self, card: ModelCard, result: AnalysisResult, headers: Sequence[pydicom.Dataset],
                  uids: ResultUids, run: int) -> pydicom.Dataset:
        from pipelines.seg_encoding import build_heatmap_seg

        level = (result.heatmap or {}).get("level_sop_instance_uid")
        slide = next((h for h in headers if h.SOPInstanceUID == level), headers[0])
        return build_heatmap_seg(card, result, slide, uids.seg_series_uid, uids.seg_sop_uid, run)

    def key_image_labels(self, card: ModelCard | None, result: dict[str, Any],
                         order: list[str]) -> list[str]:
        return ["slide with the tile probability map"] if result.get("heatmap") else []

    def render_key_image(self, card: ModelCard | None, result: dict[str, Any], index: int,
                         instances: list[dict[str, Any]]) -> bytes | None:
        from pipelines.key_images import render_slide_key_image
        from pipelines.wsi_slide import read_thumbnail_rgb

        heatmap = result.get("heatmap")
        if index != 0 or not heatmap:
            return None
        rgb = read_thumbnail_rgb([r["path"] for r in instances])
        values = np.array([np.nan if v is None or v < 0 else v for v in heatmap["values"]],
                          dtype=np.float32).reshape(heatmap["rows"], heatmap["cols"])
        threshold = card.postprocessing.threshold if card is not None else 0.5
        meaning = card.finding.code.meaning.lower() if card is not None else "finding"
        return render_slide_key_image(rgb, values, threshold, title=f"{meaning} probability")


TASK = register(WsiTiles())
