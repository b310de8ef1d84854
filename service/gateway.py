"""The gateway service (BentoML, one worker): DICOM listener, state, jobs, outbox, HTTP API.

One worker only: several workers of a service that opens port 11112 fight over the port
(more DICOM receivers are processes of their own, sharing the port with SO_REUSEPORT:
service/receiver_pool.py). With `role` receiver or worker, or `model_services` set, the model
service is not started beside it (README "Scale").
It does I/O, not pixels; pixels go to the model service, called through `bentoml.depends`.
"""

from __future__ import annotations

import asyncio
import logging

import bentoml

from service.config import load_config
from service.http_api import build_app
from service.http_edge import HttpEdge
from service.logging_setup import configure_logging
from service.model_replicas import ModelReplicas
from service.model_service import ModelService
from service.node import Node
from service.node_checks import alive, ready
from service.parent_death import die_with_parent
from service.private_files import keep_files_private

log = logging.getLogger("befund.gateway")

app = build_app()
_CONFIG = load_config()  # read again in the worker; here it decides which services run


# BentoML's HTTP metrics and access log are off here: both take the raw request path (a
# label value kept for good in memory and /metrics; a log line a decoded %0a can split).
# Tracing skips every URL: its span is named after the raw path and rides in the context that
# BentoML's TimeoutMiddleware hands to a timer it never cancels, so each request's path
# stayed in memory for `traffic.timeout` (3 copies; 10,000 long paths held 400 MB).
# HttpEdge bounds every request, counts it by route template and logs its path escaped.
@bentoml.service(name="befund", workers=1, traffic={"timeout": 60},
                 metrics={"enabled": False}, logging={"access": {"enabled": False}},
                 tracing={"excluded_urls": [".*"]})
@bentoml.asgi_app(app, path="/")
class Gateway:
    # the model service runs beside the gateway unless workers reach remote ones by URL, or
    # this instance only receives (service/model_replicas.py; README "Scale")
    if _CONFIG.role in ("all", "worker") and not _CONFIG.model_services:
        models = bentoml.depends(ModelService)

    def __init__(self) -> None:
        die_with_parent()
        keep_files_private()
        configure_logging()
        self.node = Node(load_config())
        self.node.start_receiving()

    @bentoml.on_startup
    async def start_jobs(self) -> None:
        if not self.node.works:
            return
        if self.node.config.model_services:
            replicas = ModelReplicas(self.node.config.model_services, self.node.config.model_call_timeout_s)
            self.node.start_jobs(replicas.analyse)
            return
        loop = asyncio.get_running_loop()
        client = self.models

        def analyse(model_key: str, paths: list[str]) -> dict:
            call = client.to_async.call("analyse", model=model_key, paths=paths)
            return asyncio.run_coroutine_threadsafe(call, loop).result()

        self.node.start_jobs(analyse)

    def __is_ready__(self) -> bool:
        """BentoML's /readyz asks this: every part of the node works (service/node_checks.py)."""
        return ready(self.node.checks())

    def __is_alive__(self) -> bool:
        """BentoML's /livez asks this: the node's own threads run (a restart would help)."""
        return alive(self.node.checks())

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.node.stop()


def _edge_options() -> dict:
    return {"routes": app.routes, "max_target_bytes": _CONFIG.http_max_target_bytes,
            "max_header_bytes": _CONFIG.http_max_header_bytes}


Gateway.add_asgi_middleware(HttpEdge, **_edge_options())
