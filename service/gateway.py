"""The gateway service (BentoML, one worker): DICOM listener, state, jobs, outbox, HTTP API.

One worker only: several workers of a service that opens port 11112 fight over the port.
It does I/O, not pixels; pixels go to the model service, called through `bentoml.depends`.
"""

from __future__ import annotations

import asyncio
import logging

import bentoml

from service.config import load_config
from service.http_api import build_app
from service.logging_setup import configure_logging
from service.model_service import ModelService
from service.node import Node
from service.node_checks import alive, ready
from service.parent_death import die_with_parent
from service.private_files import keep_files_private

log = logging.getLogger("befund.gateway")

app = build_app()


@bentoml.service(name="befund", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Gateway:
    models = bentoml.depends(ModelService)

    def __init__(self) -> None:
        die_with_parent()
        keep_files_private()
        configure_logging()
        self.node = Node(load_config())
        self.node.start_receiving()

    @bentoml.on_startup
    async def start_jobs(self) -> None:
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
