"""Several instances on one state DB: each job and each delivery is leased by exactly one, a
series is completed and routed once, a series received over associations at two instances
completes only when both have ended, retention keeps what another instance still needs, and a
job created at one instance wakes the others (LISTEN/NOTIFY).

Two `StateDB` objects with their own instance names stand for two instances: on PostgreSQL
they share nothing but the server; on SQLite (one instance in production) they share a file,
which shows that the same SQL holds there too."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from service.state import PlannedJob, StateDB
from tests.node_harness import poll
from tests.test_completion_routing import instance


@pytest.fixture
def two(state_db_target):
    a = StateDB(state_db_target, instance_id="a")
    b = StateDB(state_db_target, instance_id="b")
    yield a, b
    a.close()
    b.close()


def routed_series(db: StateDB, series: str, n_jobs: int = 1) -> list[int]:
    for i in range(3):
        db.record_instance(instance(series=series, sop=f"{series}.{i}", assoc=f"assoc-{series}"))
    created = db.complete_series(series, db.series(series).revision, "test", time.time(),
                                 [PlannedJob(f"m{k}", "1", 0) for k in range(n_jobs)], "routed")
    return [job_id for job_id, _ in created]


def in_threads(n: int, work) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_each_job_is_leased_by_exactly_one_instance(two):
    a, b = two
    jobs = set()
    for s in range(4):
        jobs.update(routed_series(a, f"1.2.3.{s}", n_jobs=3))
    taken: list[tuple[str, int]] = []

    def lease(i: int) -> None:
        db, owner = (a, "a") if i % 2 else (b, "b")
        while (job := db.lease_job(owner, 60)) is not None:
            taken.append((owner, job.id))

    in_threads(6, lease)
    assert sorted(job for _, job in taken) == sorted(jobs)  # each once, none missed
    rows = a.query("SELECT id, lease_owner, attempts FROM jobs")
    assert all(r["attempts"] == 1 for r in rows)
    assert {r["id"]: r["lease_owner"] for r in rows} == {job: owner for owner, job in taken}


def test_a_job_whose_lease_ran_out_is_taken_over_by_the_other_instance(two):
    a, b = two
    [job] = routed_series(a, "1.2.4.1")
    assert a.lease_job("a", 0.2).id == job
    assert b.lease_job("b", 60) is None  # a holds it
    poll(lambda: b.lease_job("b", 60), 10, 0.05, "the lease running out")
    row = a.job(job)
    assert row.lease_owner == "b" and row.attempts == 2
    assert a.renew_job_lease(job, "a", 60) is False  # a's lease is gone


def test_one_series_completed_by_two_instances_at_once_gets_its_jobs_once(two):
    a, b = two
    for i in range(3):
        a.record_instance(instance(sop=f"1.2.3.1.{i}"))
    [row] = a.series_receiving()
    results: list = []

    def complete(i: int) -> None:
        db = (a, b)[i % 2]
        results.append(db.complete_series(row.series_uid, row.revision, "association",
                                          time.time(), [PlannedJob("ich_ct", "1", 0)], "routed"))

    in_threads(8, complete)
    assert sum(1 for r in results if r) == 1  # one instance created the job, the others nothing
    assert a.query("SELECT run FROM jobs") == [{"run": 1}]
    assert a.query_one("SELECT state FROM series")["state"] == "routed"


def test_a_series_over_associations_at_two_instances_completes_when_both_have_ended(two):
    a, b = two
    a.record_instance(instance(sop="1.2.3.1.1", assoc="at-a"))
    b.record_instance(instance(sop="1.2.3.1.2", assoc="at-b"))
    assert a.record_association_end("at-a", time.time()) == 0  # b still receives it
    assert a.query_one("SELECT association_ended_at FROM series")["association_ended_at"] is None
    b.record_instance(instance(sop="1.2.3.1.3", assoc="at-b"))
    ended = time.time()
    assert b.record_association_end("at-b", ended) == 1
    row = a.query_one("SELECT association_ended_at, instance_count FROM series")
    assert row == {"association_ended_at": ended, "instance_count": 3}


def test_an_association_of_an_instance_that_died_blocks_nothing_once_it_restarts(two):
    a, b = two
    a.record_instance(instance(sop="1.2.3.1.1", assoc="cut-short"))
    b.record_instance(instance(sop="1.2.3.1.2", assoc="at-b"))
    a.end_associations_left_open("a", time.time())  # a restarted (same instance_id)
    row = a.query_one("SELECT association_ended_at FROM series")
    assert row["association_ended_at"] is None  # an association cut short completes nothing
    assert b.record_association_end("at-b", time.time()) == 1


def test_the_same_instance_indexed_at_two_instances_at_once_counts_once(two):
    a, b = two
    results: list[bool] = []
    in_threads(8, lambda i: results.append((a, b)[i % 2].record_instance(
        instance(sop="1.2.3.1.1", assoc=f"assoc-{i}"))))
    assert sorted(results) == [False] * 7 + [True]
    assert a.query("SELECT instance_count, revision FROM series") == [
        {"instance_count": 1, "revision": 1}]


def test_each_delivery_is_sent_by_exactly_one_instance(two):
    a, b = two
    for s in range(3):
        for job in routed_series(a, f"1.2.5.{s}", n_jobs=2):
            a.finish_job(job, "done", {}, "", [("dicom", "pacs", {"files": []}),
                                               ("webhook", "https://x.example/h", {})])
    leased: list[int] = []

    def send(i: int) -> None:
        db, owner = (a, "a") if i % 2 else (b, "b")
        while (row := db.lease_delivery(owner, 60)) is not None:
            leased.append(row.id)
            db.mark_delivered(row.id)

    in_threads(6, send)
    assert len(leased) == 12 and Counter(leased).most_common(1)[0][1] == 1
    assert a.outbox_counts() == {"delivered": 12}


def test_a_delivery_in_flight_is_not_sent_again_until_its_lease_runs_out(two):
    a, b = two
    [job] = routed_series(a, "1.2.6.1")
    a.finish_job(job, "done", {}, "", [("dicom", "pacs", {"files": []})])
    row = a.lease_delivery("a", 0.3)
    assert row is not None and b.lease_delivery("b", 60) is None
    assert a.due_deliveries(time.time()) == []
    taken = poll(lambda: b.lease_delivery("b", 60), 10, 0.05, "the lease running out")
    assert taken.id == row.id


def test_a_restarted_node_sends_at_once_what_its_killed_predecessor_held(two):
    """A node killed mid-delivery and started again (under a new default name) sends the result
    at once, not after `delivery.lease_s`. SQLite has one instance: every other lease is a dead
    process's. PostgreSQL: only the instance's own earlier life; another's lease runs out."""
    a, b = two
    [job] = routed_series(a, "1.2.7.1")
    a.finish_job(job, "done", {}, "", [("dicom", "pacs", {"files": []})])
    assert a.lease_delivery("a", 600) is not None  # ... and then "a" is killed
    if a.shared:
        assert b.release_orphan_deliveries("b") == 0 and b.lease_delivery("b", 60) is None
        assert a.release_orphan_deliveries("a") == 1  # "a" again, under its stable name
    else:
        assert b.release_orphan_deliveries("b") == 1
    assert b.lease_delivery("b", 60) is not None


def test_retention_keeps_a_series_that_got_a_new_run_after_it_was_found_due(two, tmp_path):
    a, b = two
    [job] = routed_series(a, "1.2.7.1")
    a.finish_job(job, "done", {}, "", [])
    assert a.series_due_for_purge(time.time() + 10) == ["1.2.7.1"]
    # meanwhile, at b: the series is asked to run again, completes and gets run 2
    b.request_ready("1.2.7.1", again=True)
    assert b.complete_series("1.2.7.1", b.series("1.2.7.1").revision, "api", time.time(),
                             [PlannedJob("m0", "1", 0)], "routed")
    assert a.mark_series_purged("1.2.7.1", time.time()) == []  # a's decision is re-checked
    assert a.query_one("SELECT COUNT(*) AS n FROM instances WHERE purged_at IS NOT NULL")["n"] == 0


def test_a_job_created_at_one_instance_wakes_the_others(pg_server):
    a = StateDB(pg_server.new_database(), instance_id="a")
    b = StateDB(a.backend.url, instance_id="b")
    try:
        woken = threading.Event()
        b.subscribe("jobs", woken.set)
        assert b.backend.listening.wait(10), "b is not listening"
        routed_series(a, "1.2.8.1")
        assert woken.wait(5), "b was not notified of a's new job"
    finally:
        a.close()
        b.close()
