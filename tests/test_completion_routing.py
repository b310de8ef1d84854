"""Series completion signals and routing by model-card selectors, on a real state DB (SQLite and
PostgreSQL: the `state_db_target` fixture runs each DB test once per backend)."""

import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.model_card import load_card
from service.completion import completion_signal
from service.completion_watcher import CompletionWatcher
from service.routing import route_series
from service.spool import StoredInstance
from service.state_db import Series, StateDB

PROJECT = Path(__file__).resolve().parent.parent
CT = "1.2.840.10008.5.1.4.1.1.2"


def series_row(**kw) -> Series:
    return replace(Series(series_uid="1.2.3.1", study_uid="1.2.3", last_received_at=100.0,
                          instance_count=10), **kw)


def test_association_end_plus_settle():
    s = series_row(association_ended_at=100.5)
    assert completion_signal(s, 101.0, settle_s=2, quiet_s=30) == ""
    assert completion_signal(s, 102.6, settle_s=2, quiet_s=30) == "association"


def test_instance_after_association_end_waits_for_quiet_timer():
    s = series_row(association_ended_at=99.0, last_received_at=100.0)
    assert completion_signal(s, 105.0, settle_s=2, quiet_s=30) == ""
    assert completion_signal(s, 130.0, settle_s=2, quiet_s=30) == "quiet"


def test_the_api_completes_at_once():
    """No "expected count": no sender announces a series' size (service/completion.py)."""
    assert completion_signal(series_row(ready_requested=True), 100.0, 2, 30) == "api"
    assert completion_signal(series_row(), 100.0, 2, 30) == ""


@pytest.fixture
def ich_card():
    return load_card(PROJECT / "models" / "ich_ct")


def facts(**kw) -> Series:
    return replace(Series(series_uid="1.2.3.1", study_uid="1.2.3", modality="CT", sop_class_uid=CT,
                          body_part="HEAD", descriptions=("", ""), image_type=("ORIGINAL", "PRIMARY"),
                          instance_count=40), **kw)


@pytest.mark.parametrize("body,descriptions,taken", [
    ("HEAD", ["", ""], True),
    ("BRAIN", ["", ""], True),
    ("", ["CT Schaedel nativ", ""], True),
    ("", ["CCT", "axial 5mm"], True),
    ("", ["", "Kopf 2.5"], True),
    ("CHEST", ["Thorax", ""], False),
    ("", ["", ""], False),
])
def test_ich_selector(ich_card, body, descriptions, taken):
    route = route_series(facts(body_part=body, descriptions=tuple(descriptions)), [ich_card])
    assert bool(route.cards) is taken
    if not taken:
        assert "no model takes this series" in route.reason


def test_results_and_localizers_are_not_routed(ich_card):
    assert route_series(facts(modality="SR"), [ich_card]).ignored
    scout = route_series(facts(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
                         [ich_card])
    assert not scout.cards


def instance(series="1.2.3.1", sop="1.2.3.1.1", assoc="a1", **kw):
    base = StoredInstance(
        path=Path("/nonexistent") / f"{sop}.dcm", size=100, sop_class_uid=CT,
        sop_instance_uid=sop, series_uid=series, study_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT", body_part="HEAD", descriptions=("", ""), image_type=("ORIGINAL",),
        instance_number=1, number_of_frames=None, patient_name="X^Y", patient_id="P1",
        accession="A1", study_date="20260101", calling_ae="SCU", peer_address="127.0.0.1",
        association_id=assoc, received_at=time.time() - 20)
    return replace(base, **kw)


def test_same_instances_again_start_no_new_run_but_late_ones_do(state_db_target, ich_card):
    db = StateDB(state_db_target)
    for i in range(3):
        db.record_instance(instance(sop=f"1.2.3.1.{i}"))
    db.record_association_end("a1", time.time() - 10)
    created = []
    watcher = CompletionWatcher(db, [ich_card], settle_s=1, quiet_s=30,
                                on_jobs=lambda: created.append(1))
    watcher.tick(time.time())
    jobs = db.query("SELECT run, instance_count FROM jobs")
    assert jobs == [{"run": 1, "instance_count": 3}]
    # The same instances again: duplicates count once, the series completes, no new run.
    for i in range(3):
        assert db.record_instance(instance(sop=f"1.2.3.1.{i}", assoc="a2")) is False
    db.record_association_end("a2", time.time() - 10)
    [answer] = watcher.request_run("1.2.3")  # the explicit trigger says why it starts nothing
    assert not answer.runs and "run 1 (ich_ct" in answer.reason and "queued" in answer.reason
    watcher.tick(time.time())
    assert len(db.query("SELECT id FROM jobs")) == 1
    # A late instance: a new, versioned run.
    db.record_instance(instance(sop="1.2.3.1.9", assoc="a3"))
    db.record_association_end("a3", time.time() - 10)
    watcher.tick(time.time())
    runs = db.query("SELECT run, instance_count FROM jobs ORDER BY run")
    assert runs == [{"run": 1, "instance_count": 3}, {"run": 2, "instance_count": 4}]


def test_series_no_model_is_flagged_with_reason(state_db_target, ich_card):
    db = StateDB(state_db_target)
    db.record_instance(instance(body_part="CHEST", descriptions=("Thorax", "")))
    db.record_association_end("a1", time.time() - 10)
    CompletionWatcher(db, [ich_card], 1, 30, on_jobs=lambda: None).tick(time.time())
    row = db.query_one("SELECT state, reason FROM series")
    assert row["state"] == "no_model" and "CHEST" in row["reason"]


def test_a_new_version_of_an_instance_starts_a_new_run_and_force_runs_again(state_db_target, ich_card):
    db = StateDB(state_db_target)
    for i in range(3):
        db.record_instance(instance(sop=f"1.2.3.1.{i}"))
    db.record_association_end("a1", time.time() - 10)
    watcher = CompletionWatcher(db, [ich_card], settle_s=1, quiet_s=30, on_jobs=lambda: None)
    watcher.tick(time.time())
    # Other content under a known SOP Instance UID: version 2, same count, a new run.
    changed = instance(sop="1.2.3.1.1", assoc="a2", version=2,
                       path=Path("/nonexistent") / "1.2.3.1.1.v2.dcm")
    assert db.record_instance(changed) is True
    assert db.indexed_instance("1.2.3.1.1").version == 2
    assert db.record_instance(changed) is False  # the same version again changes nothing
    db.record_association_end("a2", time.time() - 10)
    watcher.tick(time.time())
    runs = db.query("SELECT run, instance_count FROM jobs ORDER BY run")
    assert runs == [{"run": 1, "instance_count": 3}, {"run": 2, "instance_count": 3}]
    # A run still queued: asked again, it says so and starts nothing, even when forced.
    [answer] = watcher.request_run("1.2.3", force=True)
    assert not answer.runs and "run 2 (ich_ct" in answer.reason and "queued" in answer.reason
    with db.transaction() as tx:
        tx.execute("UPDATE jobs SET state='done'")
    assert not watcher.request_run("1.2.3")[0].runs
    assert watcher.request_run("1.2.3", force=True)[0].runs
    watcher.tick(time.time())
    assert [r["run"] for r in db.query("SELECT run FROM jobs ORDER BY run")] == [1, 2, 3]
    assert watcher.request_run("1.9.9") is None  # an unknown study


def test_the_same_sop_instance_uid_under_another_series_is_refused_and_moves_nothing(state_db_target):
    from service.spool import InstanceElsewhere

    db = StateDB(state_db_target)
    db.record_instance(instance(sop="1.2.3.1.1"))
    with pytest.raises(InstanceElsewhere):
        db.record_instance(instance(sop="1.2.3.1.1", series="1.2.3.2", assoc="a2"))
    assert db.query("SELECT series_uid, study_uid FROM instances") == [
        {"series_uid": "1.2.3.1", "study_uid": "1.2.3"}]
    assert db.query("SELECT series_uid, instance_count FROM series") == [
        {"series_uid": "1.2.3.1", "instance_count": 1}]
