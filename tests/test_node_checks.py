"""Readiness and liveness of a real in-process node, part by part (service/node_checks.py).

What an IT team's monitor must see: a node that refuses instances (spool below its
watermark), cannot read its state, loaded no model, or whose listener or job runner stopped is
not ready, and says which part and why; only a stopped thread of its own makes it not alive.
The node over HTTP (`/readyz`, `/livez`, `GET /status`, the worklist alert) is tested in
tests/test_worklist_browser.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service import metrics
from service.config import Config
from service.node import Node
from service.node_checks import alive, node_checks, ready, status
from tests.node_harness import REFERENCE_MODELS, poll

PROJECT = Path(__file__).resolve().parent.parent


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


@pytest.fixture()
def node(tmp_path):
    cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(tmp_path / "var"), min_free_bytes=0,
                 models_dir=str(REFERENCE_MODELS), token="t")
    n = Node(cfg)
    n.start_receiving()
    yield n
    n.stop()


def analyse_nothing(model_key: str, paths: list[str]) -> dict:
    raise AssertionError("no job is expected in these tests")


def test_ready_only_once_the_job_runner_runs(node):
    checks = node.checks()
    assert by_name(checks)["jobs"].ok is False
    assert "has not started" in by_name(checks)["jobs"].detail
    assert not ready(checks) and alive(checks)
    node.start_jobs(analyse_nothing)
    checks = node.checks()
    assert ready(checks), status(checks)
    assert [c.name for c in checks] == ["dicom", "spool", "state_db", "models", "completion", "jobs",
                                        "delivery"]
    assert str(node.listener.port) in by_name(checks)["dicom"].detail
    assert all(card.key in by_name(checks)["models"].detail for card in node.cards)
    assert metrics.NODE_READY._value.get() == 1


def test_spool_below_watermark_is_not_ready_but_alive_and_says_why(node, caplog):
    node.start_jobs(analyse_nothing)
    node.spool.min_free_bytes = 1 << 62
    with caplog.at_level(logging.WARNING, logger="befund.node"):
        checks = node.checks()
        node.checks()  # the same failure is logged once, not on every probe
    spool = by_name(checks)["spool"]
    assert not spool.ok and "new instances are refused" in spool.detail
    assert not ready(checks) and alive(checks)
    assert [r.getMessage() for r in caplog.records if "not ready" in r.getMessage()] == \
        ["node not ready: spool: " + spool.detail]
    assert metrics.NODE_CHECK.labels("spool")._value.get() == 0
    node.spool.min_free_bytes = 0
    assert ready(node.checks())


def test_a_stopped_listener_or_runner_is_neither_ready_nor_alive(node):
    node.start_jobs(analyse_nothing)
    node.listener.stop()
    checks = node.checks()
    assert by_name(checks)["dicom"].ok is False
    assert not ready(checks) and not alive(checks)
    node.runner.stop()
    jobs = by_name(node_checks(node))["jobs"]
    assert not jobs.ok and "stopped" in jobs.detail


def test_no_model_loaded_is_not_ready(tmp_path):
    cfg = Config(dicom_host="127.0.0.1", dicom_port=0, var_dir=str(tmp_path / "var"), min_free_bytes=0,
                 models_dir=str(tmp_path / "no-models"), token="t")
    n = Node(cfg, cards=[])
    n.start_receiving()
    try:
        n.start_jobs(analyse_nothing)
        checks = n.checks()
        assert [c.name for c in checks if not c.ok] == ["models"]
        assert "no model is loaded" in by_name(checks)["models"].detail
    finally:
        n.stop()


def test_the_job_runner_outlives_a_state_db_it_cannot_read(node, caplog):
    """A failing lease used to end the runner thread in silence; now it retries and says so."""
    node.start_jobs(analyse_nothing)
    with caplog.at_level(logging.ERROR, logger="befund.jobs"):
        node.db.close()
        poll(lambda: any("cannot reach the state DB" in r.getMessage() for r in caplog.records),
             10, 0.05, "the runner's error in the log")
    checks = node_checks(node)
    assert node.runner.alive()
    assert by_name(checks)["state_db"].ok is False
    assert not ready(checks) and alive(checks)
