"""Feeds the worklist page from the node: study rows and the key images of the shown result.

Key images are rendered on request from the spooled files by the result's task
(pipelines/tasks/): for CT every slice the model's result names (the card's `key_images`), at
512 px, with the finding outlined, the window and slice position in the caption; for slides
the heatmap with its colour bar. The study's key images are the lead job's, then those of any
other current positive result with a segmentation mask (its outline; labels then name the
model), numbered in that order.
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines.model_card import CardError
from pipelines.tasks import task_named
from service.node import current_node
from service.state_db import Job, JobState
from service.study_status import current_reader_jobs, lead_job

log = logging.getLogger("befund.worklist")


def _lead_job(node: Any, study_uid: str) -> Job | None:
    """The analysed job whose result the row shows (service/study_status.py `lead_job`)."""
    job = lead_job(node.db.jobs_of(study_uid))
    return job if job is not None and job.state is JobState.DONE and job.result else None


def _image_jobs(node: Any, study_uid: str) -> list[Job]:
    """The jobs whose key images the study shows: the lead job's, then those of the other
    current positive results that carry a segmentation mask (ich_seg beside ich_ct: the
    classifier's certainty leads the row, the mask's outline must still be seen)."""
    lead = _lead_job(node, study_uid)
    if lead is None:
        return []
    others = [j for j in current_reader_jobs(node.db.jobs_of(study_uid))
              if j.id != lead.id and j.state is JobState.DONE and j.result
              and j.result.get("present") is True and j.result.get("segmentation")]
    return [lead, *sorted(others, key=lambda j: j.id)]


def _card(node: Any, job: Job) -> Any:
    return next((c for c in node.cards
                 if c.name == job.model_name and c.version == job.model_version), None)


def _task(card: Any, job: Job) -> Any:
    """The task that renders the job's key images: its card's, else the one its result names
    (a model no longer installed); None when neither says."""
    name = card.task if card is not None else job.result.get("task")
    if not name:
        return None
    try:
        return task_named(name)
    except CardError:
        return None


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
        """What the detail page shows of each key image: its URL and a line that says which
        (with the model's name when more than one model's images are shown)."""
        node = current_node()
        views: list[dict] = []
        jobs = _image_jobs(node, study_uid)
        for job in jobs:
            card = _card(node, job)
            task = _task(card, job)
            if task is None:
                continue
            order = [r["sop_instance_uid"] for r in node.db.series_instances(job.series_uid)]
            for label in task.key_image_labels(card, job.result, order):
                views.append({"url": f"/studies/{study_uid}/key-images/{len(views)}.png",
                              "label": f"{job.model_name}: {label}" if len(jobs) > 1 else label})
        return views

    def key_image_png(self, study_uid: str, index: int = 0) -> bytes | None:
        node = current_node()
        for job in _image_jobs(node, study_uid):
            card = _card(node, job)
            task = _task(card, job)
            if task is None:
                continue
            rows = node.db.series_instances(job.series_uid)
            count = len(task.key_image_labels(card, job.result, [r["sop_instance_uid"] for r in rows]))
            if index >= count:
                index -= count
                continue
            # the pixels that run analysed: a newer version of an image belongs to a later run
            instances = [r for r in rows if r["purged_at"] is None
                         and (r["version"] == 1 or (r["received_at"] or 0) <= job.created_at)]
            try:
                return task.render_key_image(card, job.result, index, instances)
            except Exception as exc:  # noqa: BLE001 - a key image must never break the page
                log.warning("key image %d of study %s could not be rendered: %s", index, study_uid, exc)
            return None
        return None
