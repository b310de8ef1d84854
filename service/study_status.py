"""One status per study for the API and the worklist, derived from series, jobs and deliveries.

States: receiving, waiting, running, done, delivered, not analysed (with reason), delivery
failed. A study never shows as negative unless a model analysed it and said so.

Only active models' jobs make a study's state and verdict: a shadow job (a model version run
for comparison, pipelines/model_lineup.py) never flags, never shows as running or not
analysed, and is listed among the study's jobs only for those who may see shadow results.
"""

from __future__ import annotations

import time
from typing import Any

from service.job_failures import Stage
from service.state_db import Delivery, DeliveryState, Job, JobState, SeriesState, StateDB

STATE_ORDER = ["receiving", "waiting", "running", "delivery failed", "not analysed", "done",
               "delivered"]


def _standing_positives(all_jobs: list[Job],
                        latest: list[Job]) -> list[Job]:
    """Earlier positive runs that no later run has replaced with an analysis of its own.

    When the newest run of a series could not analyse it (e.g. its files had gone with
    retention), the last positive verdict keeps flagging the study: a flag must not vanish
    because a later attempt failed. A later run that did analyse replaces it, as always.
    """
    standing = []
    for newest in latest:
        if newest.state is JobState.DONE:
            continue
        earlier = [j for j in all_jobs
                   if (j.series_uid, j.model_name, j.model_version)
                   == (newest.series_uid, newest.model_name, newest.model_version)
                   and j.run < newest.run and j.state is JobState.DONE]
        if earlier:
            last = max(earlier, key=lambda j: j.run)
            if last.result.get("present"):
                standing.append(last)
    return standing


def _latest_jobs(jobs: list[Job]) -> list[Job]:
    """The newest run per (series, model version)."""
    latest: dict[tuple, Job] = {}
    for job in jobs:
        key = (job.series_uid, job.model_name, job.model_version)
        if key not in latest or job.run > latest[key].run:
            latest[key] = job
    return list(latest.values())


def lead_job(all_jobs: list[Job]) -> Job | None:
    """The run whose verdict the worklist shows for a study: among the newest run per series
    and model (an earlier run superseded by a later one never leads) and the positives that
    still stand, a positive outranks negatives, then the higher certainty. Shadow jobs never lead."""
    all_jobs = reader_jobs(all_jobs)
    jobs = _latest_jobs(all_jobs)
    analysed = [j for j in jobs if j.state is JobState.DONE and _result(j).get("present") is not None]
    analysed += _standing_positives(all_jobs, jobs)
    if analysed:
        return max(analysed, key=lambda j: (bool(_result(j).get("present")),
                                            _result(j).get("certainty") or 0))
    return max(jobs, key=lambda j: j.id) if jobs else None


def current_reader_jobs(all_jobs: list[Job]) -> list[Job]:
    """The newest run per series and model of the jobs readers see."""
    return _latest_jobs(reader_jobs(all_jobs))


def reader_jobs(jobs: list[Job]) -> list[Job]:
    """The jobs whose results readers see: those of active models, never shadow ones."""
    return [j for j in jobs if not j.shadow]


def _result(job: Job) -> dict[str, Any]:
    return job.result


def job_view(job: Job) -> dict[str, Any]:
    result = job.result
    return {
        "id": job.id, "series_uid": job.series_uid, "model": job.model_name,
        "model_version": job.model_version, "run": job.run, "state": str(job.state),
        "attempts": job.attempts, "last_error": job.last_error,
        "stage": Stage.stored(job.stage).label if job.stage else "",
        "present": result.get("present"), "certainty": result.get("certainty"),
        "score": result.get("score"), "threshold": result.get("threshold"),
        "threshold_source": result.get("threshold_source") or ("card" if result.get("threshold") else ""),
        "mode": str(job.mode),
        "reason": result.get("reason") or "", "finding": result.get("finding"),
        "priority": result.get("priority") or "normal",
        "measurements": result.get("measurements") or {},
        "key_images": result.get("key_images") or [],
        "timings": result.get("timings") or {},
        "created_at": job.created_at, "finished_at": job.finished_at,
    }


def delivery_view(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "job_id": d.job_id, "kind": d.kind, "destination": d.destination,
            "state": str(d.state), "attempts": d.attempts, "last_error": d.last_error,
            "next_attempt_at": d.next_attempt_at, "created_at": d.created_at,
            "delivered_at": d.delivered_at}


def _job_state(job: Job, deliveries: list[Delivery]) -> tuple[str, str]:
    mine = [d for d in deliveries if d.job_id == job.id]
    result = job.result
    if job.state is JobState.QUEUED:
        if job.last_error and job.stage:  # an attempt failed; the next one is due
            return "waiting", (f"attempt {job.attempts} failed in "
                               f"{Stage.stored(job.stage).label}: {job.last_error}; retrying")
        return "waiting", ""
    if job.state is JobState.RUNNING:
        return "running", ""
    if job.state in (JobState.NOT_ANALYSED, JobState.FAILED):
        return "not analysed", result.get("reason") or job.last_error or "analysis failed"
    if any(d.state is DeliveryState.DEAD for d in mine):
        bad = next(d for d in mine if d.state is DeliveryState.DEAD)
        return "delivery failed", f"{bad.kind} to {bad.destination}: {bad.last_error}"
    if mine and all(d.state is DeliveryState.DELIVERED for d in mine):
        return "delivered", ""
    return "done", ""


def study_row(db: StateDB, study: dict[str, Any], settle_s: float,
              now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    uid = study["study_uid"]
    series = db.series_of(uid)
    every_job = db.jobs_of(uid)
    shadow_only = {j.series_uid for j in every_job if j.shadow}
    all_jobs = reader_jobs(every_job)
    jobs = _latest_jobs(all_jobs)
    deliveries = db.deliveries_of(uid)
    states: list[tuple[str, str]] = []
    for s in series:
        if s.state is SeriesState.RECEIVING:
            recent = now - (s.last_received_at or 0) < settle_s + 1.0
            states.append(("receiving" if recent else "waiting", ""))
        elif s.state is SeriesState.NO_MODEL and not any(j.series_uid == s.series_uid for j in jobs):
            states.append(("not analysed", s.reason))
        elif s.series_uid in shadow_only and not any(j.series_uid == s.series_uid for j in jobs):
            states.append(("not analysed", "no active model takes this series (only a model in "
                                           "shadow mode runs on it; its results are not shown)"))
    states.extend(_job_state(j, deliveries) for j in jobs)
    if not states:
        states = [("not analysed", "no image series in this study")]
    state, reason = min(states, key=lambda sr: STATE_ORDER.index(sr[0]))
    lead_row = lead_job(all_jobs)
    lead = job_view(lead_row) if lead_row else None
    modality = ",".join(sorted({s.modality for s in series if s.modality} - {"SR", "SEG"}))
    return {
        "study_uid": uid,
        "patient_name": study.get("patient_name") or "",
        "patient_id": study.get("patient_id") or "",
        "accession": study.get("accession") or "",
        "study_date": study.get("study_date") or "",
        "modality": modality,
        "received_at": study["first_received_at"],
        "updated_at": study["updated_at"],
        "state": state,
        "reason": reason,
        "model": lead["model"] if lead else None,
        "model_version": lead["model_version"] if lead else None,
        "run": lead["run"] if lead else None,
        "present": lead["present"] if lead else None,
        "certainty": lead["certainty"] if lead else None,
        "score": lead["score"] if lead else None,
        "priority": lead["priority"] if lead and lead["present"] else "normal",
        **segmented_volume(jobs),
        "key_image": f"/studies/{uid}/key-image.png" if lead and lead["key_images"] else None,
        "series_count": len(series),
        "instance_count": sum(s.instance_count for s in series),
    }


def segmented_volume(jobs: list[Job]) -> dict[str, Any]:
    """`volume_ml` and `volume_model`: the volume a segmentation model (ich_seg) measured of a
    finding it calls present, among the newest runs, whichever model's verdict leads the row
    (a slice classifier and a segmentation model on one head CT: the row shows the classifier's
    certainty and the segmentation's volume). The larger when two models measure one."""
    measured = [(float(j.result["measurements"]["volume_ml"]), j.model_name) for j in jobs
                if j.state is JobState.DONE and j.result.get("present") is True
                and isinstance((j.result.get("measurements") or {}).get("volume_ml"), (int, float))]
    volume, model = max(measured) if measured else (None, None)
    return {"volume_ml": volume, "volume_model": model}


def study_detail(db: StateDB, study_uid: str, settle_s: float,
                 with_shadow: bool = False) -> dict[str, Any] | None:
    """The study's row with its series, jobs and deliveries; shadow jobs only `with_shadow`."""
    study = db.study(study_uid)
    if study is None:
        return None
    row = study_row(db, study, settle_s)
    row["series"] = [
        {"series_uid": s.series_uid, "modality": s.modality,
         "description": " / ".join(s.descriptions),
         "instance_count": s.instance_count, "state": str(s.state), "reason": s.reason,
         "completed_by": s.completed_by}
        for s in db.series_of(study_uid)]
    jobs = db.jobs_of(study_uid) if with_shadow else reader_jobs(db.jobs_of(study_uid))
    row["jobs"] = [{**job_view(j), "superseded_by_run": _superseded_by(j, jobs)} for j in jobs]
    row["deliveries"] = [delivery_view(d) for d in db.deliveries_of(study_uid)]
    return row


def _superseded_by(job: Job, jobs: list[Job]) -> int | None:
    """The next run of the same series and model version (whose SR supersedes this one's)."""
    later = [j.run for j in jobs
             if (j.series_uid, j.model_name, j.model_version)
             == (job.series_uid, job.model_name, job.model_version) and j.run > job.run]
    return min(later) if later else None


def all_study_rows(db: StateDB, settle_s: float) -> list[Job]:
    now = time.time()
    return [study_row(db, s, settle_s, now) for s in db.studies()]
