"""Prometheus metrics, all named `befund_*`. One place, so dashboards have one list to read."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

INSTANCES_RECEIVED = Counter(
    "befund_instances_received_total", "Instances durably stored and acknowledged", ["modality"])
BYTES_RECEIVED = Counter("befund_bytes_received_total", "Bytes of acknowledged instances")
# Instances received again (same SOP Instance UID): a PACS that forwards a study twice shows here.
INSTANCES_DUPLICATE = Counter(
    "befund_instances_duplicate_total", "Acknowledged instances whose SOP Instance UID was known",
    ["modality"])
INSTANCES_REJECTED = Counter(
    "befund_instances_rejected_total", "C-STORE requests answered with a failure status", ["reason"])
ASSOCIATIONS = Counter("befund_associations_total", "DICOM associations", ["outcome"])
SERIES_COMPLETED = Counter(
    "befund_series_completed_total", "Series declared complete, by signal", ["signal"])
JOBS = Gauge("befund_jobs", "Jobs by state", ["state"])
JOB_OUTCOMES = Counter("befund_job_outcomes_total", "Finished jobs", ["model", "outcome"])
STAGE_SECONDS = Histogram(
    "befund_stage_duration_seconds", "Duration of a pipeline stage", ["model", "stage"],
    buckets=STAGE_BUCKETS)
TIME_TO_RESULT = Histogram(
    "befund_time_to_result_seconds",
    "From series complete to result accepted by the destination", ["model", "kind"],
    buckets=STAGE_BUCKETS)
DELIVERIES = Counter("befund_deliveries_total", "Delivery attempts", ["kind", "outcome"])
OUTBOX_PENDING = Gauge("befund_outbox", "Outbox entries by state", ["state"])
WSI_TILES = Counter("befund_wsi_tiles_analysed_total", "Tissue tiles analysed", ["model"])
WSI_TISSUE_FRACTION = Histogram(
    "befund_wsi_tissue_fraction", "Fraction of the slide's tile grid that holds tissue",
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0))
FINDINGS = Counter("befund_findings_total", "Analysed results by verdict", ["model", "verdict"])
# One value per node, not per process: under BentoML every process exports its gauges, and the
# model service's process would add a 0 beside the gateway's 1 ("livemax" keeps the gateway's).
NODE_READY = Gauge("befund_node_ready", "1 while every readiness check holds (GET /status says which fails)",
                   multiprocess_mode="livemax")
NODE_CHECK = Gauge("befund_node_check_ok", "1 while this part of the node works", ["check"],
                   multiprocess_mode="livemax")
SPOOL_FREE_BYTES = Gauge("befund_spool_free_bytes", "Free bytes on the spool's file system",
                         multiprocess_mode="livemax")
# HTTP, labelled by route template (service/http_edge.py), never by the raw path: a path holds
# UIDs and whatever a peer chose to send, and each new label value would be kept forever.
HTTP_REQUESTS = Counter("befund_http_requests_total", "HTTP requests answered, by route template",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("befund_http_request_duration_seconds", "HTTP request duration by route template",
                         ["route"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30))
HTTP_REFUSED = Counter("befund_http_refused_total",
                       "HTTP requests refused by a limit or check of the token gate or the edge", ["reason"])
JOB_ATTEMPT_FAILURES = Counter(
    "befund_job_attempt_failures_total", "Job attempts that failed, by the stage they failed in",
    ["stage"])
