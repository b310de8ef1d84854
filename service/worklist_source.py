"""Feeds the worklist page from the node: study rows and the key images of the shown result.

Key images are rendered on request from the spooled files (pipelines/key_images.py): every
one the model's result names (the card's `key_images`), at 512 px, with the finding outlined,
the window and slice position in the caption; for slides the heatmap with its colour bar.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom

from pipelines.key_images import render_ct_key_image, render_slide_key_image, slice_label, window_label
from service.node import current_node
from service.state_db import Job, JobState
from service.study_status import lead_job

log = logging.getLogger("befund.worklist")


def _lead_job(node: Any, study_uid: str) -> Job | None:
    """The analysed job whose result the row shows (service/study_status.py `lead_job`)."""
    job = lead_job(node.db.jobs_of(study_uid))
    return job if job is not None and job.state is JobState.DONE and job.result else None


def _card(node: Any, job: Job) -> Any:
    return next((c for c in node.cards
                 if c.name == job.model_name and c.version == job.model_version), None)


def _window(card: Any) -> tuple[float, float]:
    if card is not None and card.task == "ct-slices":
        return tuple(card.preprocessing.windows[0])
    return (40.0, 80.0)


class NodeWorklistSource:
    def studies(self) -> list[dict]:
        from service.http_api import sorted_study_rows

        return sorted_study_rows()

    def study(self, study_uid: str) -> dict | None:
        from service.http_api import reader_detail

        return reader_detail(study_uid)

    def shadow_studies(self) -> list[dict]:
        """The shadow view's rows (service/shadow_report.py), the last DEFAULT_DAYS days."""
        import time

        from service.shadow_report import parse_since, shadow_rows

        return shadow_rows(current_node().db, parse_since(None, time.time()))

    def key_image_views(self, study_uid: str) -> list[dict]:
        """What the detail page shows of each key image: its URL and a line that says which."""
        node = current_node()
        job = _lead_job(node, study_uid)
        if job is None:
            return []
        result = job.result
        if result.get("heatmap"):
            return [{"url": f"/studies/{study_uid}/key-images/0.png",
                     "label": "slide with the tile probability map"}]
        card = _card(node, job)
        order = [r["sop_instance_uid"] for r in node.db.series_instances(job.series_uid)]
        views = []
        for i, key in enumerate(result.get("key_images") or []):
            uid = key["sop_instance_uid"]
            where = slice_label(order.index(uid) + 1, len(order), None) if uid in order else "slice"
            views.append({"url": f"/studies/{study_uid}/key-images/{i}.png",
                          "label": f"{where}, {window_label(_window(card))}, score {key['score']:.2f}"})
        return views

    def key_image_png(self, study_uid: str, index: int = 0) -> bytes | None:
        node = current_node()
        job = _lead_job(node, study_uid)
        if job is None:
            return None
        result = job.result
        # the pixels that run analysed: a newer version of an image belongs to a later run
        instances = [r for r in node.db.series_instances(job.series_uid) if r["purged_at"] is None
                     and (r["version"] == 1 or (r["received_at"] or 0) <= job.created_at)]
        try:
            if result.get("heatmap"):
                return self._slide_png(result, instances, _card(node, job)) if index == 0 else None
            keys = result.get("key_images") or []
            if index >= len(keys):
                return None
            return self._ct_png(keys[index], instances, _card(node, job))
        except Exception as exc:  # noqa: BLE001 - a key image must never break the page
            log.warning("key image %d of study %s could not be rendered: %s", index, study_uid, exc)
        return None

    def _ct_png(self, key: dict, instances: list[dict], card: Any) -> bytes | None:
        order = [r["sop_instance_uid"] for r in instances]
        if key["sop_instance_uid"] not in order:
            return None
        row = instances[order.index(key["sop_instance_uid"])]
        ds = pydicom.dcmread(row["path"])
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) \
            + float(getattr(ds, "RescaleIntercept", 0))
        position = getattr(ds, "ImagePositionPatient", None)
        z = float(position[2]) if position is not None and len(position) == 3 else None
        where = slice_label(order.index(key["sop_instance_uid"]) + 1, len(order), z)
        return render_ct_key_image(hu, _window(card), where, score=key.get("score"))

    def _slide_png(self, result: dict, instances: list[dict], card: Any) -> bytes | None:
        from pipelines.wsi_slide import read_thumbnail_rgb

        heatmap = result["heatmap"]
        rgb = read_thumbnail_rgb([r["path"] for r in instances])
        values = np.array([np.nan if v is None or v < 0 else v for v in heatmap["values"]],
                          dtype=np.float32).reshape(heatmap["rows"], heatmap["cols"])
        threshold = card.postprocessing.threshold if card is not None else 0.5
        meaning = card.finding.code.meaning.lower() if card is not None else "finding"
        return render_slide_key_image(rgb, values, threshold, title=f"{meaning} probability")
