"""Feeds the worklist page from the node: study rows and key-image thumbnails."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydicom

from pipelines.thumbnails import render_ct_png, render_heatmap_png
from service.node import current_node
from service.study_status import lead_job, study_detail

log = logging.getLogger("befund.worklist")


class NodeWorklistSource:
    def studies(self) -> list[dict]:
        from service.http_api import sorted_study_rows

        return sorted_study_rows()

    def study(self, study_uid: str) -> dict | None:
        node = current_node()
        return study_detail(node.db, study_uid, node.config.settle_s)

    def key_image_png(self, study_uid: str) -> bytes | None:
        """The key image of the run the worklist row shows, rendered from the pixels that run
        analysed; None when a newer version of the image arrived since (a later run is due)."""
        node = current_node()
        job = lead_job(node.db.jobs_of(study_uid))
        if job is None or job["state"] != "done" or not job["result"]:
            return None
        result = json.loads(job["result"])
        card = next((c for c in node.cards
                     if c.name == job["model_name"] and c.version == job["model_version"]), None)
        keys = result.get("key_images") or []
        instances = {r["sop_instance_uid"]: r for r in node.db.series_instances(job["series_uid"])
                     if r["version"] == 1 or (r["received_at"] or 0) <= job["created_at"]}
        try:
            if result.get("heatmap"):
                return self._heatmap_png(result["heatmap"], instances)
            if keys and keys[0]["sop_instance_uid"] in instances:
                ds = pydicom.dcmread(instances[keys[0]["sop_instance_uid"]]["path"])
                hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) \
                    + float(getattr(ds, "RescaleIntercept", 0))
                window = card.preprocessing.windows[0] if card and card.task == "ct-slices" \
                    else (40.0, 80.0)
                return render_ct_png(hu, window=window)
        except Exception as exc:  # noqa: BLE001 - a thumbnail must never break the page
            log.warning("key image for study %s could not be rendered: %s", study_uid, exc)
        return None

    def _heatmap_png(self, heatmap: dict, instances: dict) -> bytes | None:
        from pipelines.wsi_slide import read_thumbnail_rgb

        paths = [r["path"] for r in instances.values()]
        rgb = read_thumbnail_rgb(paths)
        values = np.array([np.nan if v is None or v < 0 else v for v in heatmap["values"]],
                          dtype=np.float32).reshape(heatmap["rows"], heatmap["cols"])
        return render_heatmap_png(rgb, values)
