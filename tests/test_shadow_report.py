"""The shadow report on a real state DB (SQLite and PostgreSQL): pairs of active and shadow jobs
on the same series revision, agreement, Cohen's kappa, flag rates, the disagreeing studies by
UID, and the bounds on what a caller asks (`since`, rows read, studies listed)."""

from __future__ import annotations

import time

import pytest

from pipelines.agreement import Agreement
from service.shadow_report import ReportError, parse_since, shadow_report, shadow_rows
from service.state_db import StateDB
from tests.test_completion_routing import instance

NOW = time.time()


def finished(db: StateDB, series: str, version: str, mode: str, present: bool | None,
             score: float | None = None) -> int:
    """A job of ich_ct `version` in `mode` on `series`, finished with this verdict."""
    row = db.series(series)
    job_id = db.create_job_if_new(row, "ich_ct", version, 0, NOW, mode=mode)
    result = ({"analysed": False, "present": None, "reason": "3 slices"} if present is None else
              {"analysed": True, "present": present, "score": score, "threshold": 0.5})
    db.finish_job(job_id, "done" if present is not None else "not_analysed", result, "", [])
    return job_id


def series(db: StateDB, k: int) -> str:
    uid = f"1.2.826.0.9.{k}.1"
    db.record_instance(instance(series=uid, sop=f"{uid}.1", study_uid=f"1.2.826.0.9.{k}"))
    return uid


def test_cohens_kappa_and_agreement_by_hand():
    table = Agreement.of([(True, True)] * 20 + [(True, False)] * 5 + [(False, True)] * 10
                         + [(False, False)] * 15)
    assert table.n == 50 and table.observed == pytest.approx(0.7)
    assert (table.first_flag_rate, table.second_flag_rate) == (0.5, 0.6)
    assert table.kappa == pytest.approx(0.4)  # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5
    assert Agreement.of([(False, False)] * 4).kappa is None  # chance explains everything
    assert Agreement().observed is None and Agreement().kappa is None


def test_the_report_pairs_active_and_shadow_jobs_on_the_same_series(state_db_target):
    db = StateDB(state_db_target)
    try:
        verdicts = [(True, True), (True, True), (False, False), (False, False), (False, False),
                    (True, False), (False, True), (False, True)]
        for k, (a, s) in enumerate(verdicts):
            uid = series(db, k)
            finished(db, uid, "0.1.0", "active", a, 0.9 if a else 0.1)
            finished(db, uid, "0.2.0", "shadow", s, 0.8 if s else 0.2)
        uid = series(db, 20)  # the shadow version could not analyse this one
        finished(db, uid, "0.1.0", "active", True, 0.7)
        finished(db, uid, "0.2.0", "shadow", None)
        finished(db, series(db, 21), "0.1.0", "active", False, 0.1)  # seen by the active one only

        report = shadow_report(db, "ich_ct", NOW - 3600)
        [pair] = report["pairs"]
        assert (pair["active"], pair["shadow"]) == ("0.1.0", "0.2.0")
        assert pair["series_seen_by_both"] == 9 and pair["studies_seen_by_both"] == 9
        assert pair["analysed_by_both"] == 8 and pair["analysed_by_one_only"] == 1
        assert pair["table"] == {"both_positive": 2, "active_only": 1, "shadow_only": 2,
                                 "both_negative": 3}
        assert pair["agreement"] == pytest.approx(5 / 8)
        expected = Agreement(2, 1, 2, 3).kappa
        assert pair["kappa"] == pytest.approx(expected, abs=1e-4)
        assert pair["flag_rate"] == {"active": 0.375, "shadow": 0.5}
        assert pair["seen"] == {"active": 10, "shadow": 9}
        assert pair["disagreements_total"] == 4
        flips = {d["series_uid"]: d for d in pair["disagreements"]}
        assert set(flips) == {"1.2.826.0.9.5.1", "1.2.826.0.9.6.1", "1.2.826.0.9.7.1",
                              "1.2.826.0.9.20.1"}
        assert flips["1.2.826.0.9.20.1"]["kind"] == "analysed_by_one_only"
        assert flips["1.2.826.0.9.5.1"]["active"] == {
            "job_id": flips["1.2.826.0.9.5.1"]["active"]["job_id"], "present": True, "score": 0.9,
            "threshold": 0.5}
        assert "X^Y" not in str(report) and "P1" not in str(report)  # no patient name or ID

        rows = shadow_rows(db, NOW - 3600)
        assert len(rows) == 9 and sum(r["agree"] is False for r in rows) == 3
        assert all(r["shadow"]["version"] == "0.2.0" and r["active"]["version"] == "0.1.0"
                   for r in rows)
        # outside the window: nothing to compare, and the report says so
        empty = shadow_report(db, "ich_ct", NOW + 30)
        assert empty["pairs"] == [] and "no finished jobs" in empty["notice"]
    finally:
        db.close()


def test_a_new_run_of_a_series_replaces_the_earlier_pair(tmp_path):
    db = StateDB(tmp_path / "state.sqlite")
    try:
        uid = series(db, 1)
        finished(db, uid, "0.1.0", "active", True, 0.9)
        finished(db, uid, "0.2.0", "shadow", False, 0.3)
        db.record_instance(instance(series=uid, sop=f"{uid}.2", study_uid="1.2.826.0.9.1"))
        finished(db, uid, "0.1.0", "active", True, 0.9)
        finished(db, uid, "0.2.0", "shadow", True, 0.6)  # on the late slices it agrees
        [pair] = shadow_report(db, "ich_ct", NOW - 3600)["pairs"]
        assert pair["series_seen_by_both"] == 1 and pair["table"]["both_positive"] == 1
        assert pair["disagreements_total"] == 0 and pair["kappa"] is None
        assert "same verdict" in pair["kappa_note"]
    finally:
        db.close()


@pytest.mark.parametrize("text,seconds_back", [
    (None, 30 * 86400), ("", 30 * 86400), ("7d", 7 * 86400), ("12h", 12 * 3600), ("90m", 5400),
])
def test_since_as_a_span_back_from_now(text, seconds_back):
    assert parse_since(text, NOW) == pytest.approx(NOW - seconds_back)


def test_since_as_a_date_or_time():
    assert parse_since("2026-11-01", 1_796_000_000) == 1_793_491_200  # midnight UTC
    assert parse_since("2026-11-01T01:00:00+01:00", 1_796_000_000) == 1_793_491_200


@pytest.mark.parametrize("text,message", [
    ("yesterday", "is neither a date"),
    ("2999-01-01", "lies in the future"),
    ("401d", "more than 400 days back"),
    ("1" * 41, "at most 40 characters"),
    ("9999999d", "is neither a date"),
])
def test_a_bad_since_is_refused_saying_what_to_give(text, message):
    with pytest.raises(ReportError) as err:
        parse_since(text, NOW)
    assert message in str(err.value)


def test_a_name_that_is_no_model_name_is_refused(tmp_path):
    db = StateDB(tmp_path / "state.sqlite")
    try:
        with pytest.raises(ReportError):
            shadow_report(db, "../etc", NOW - 60)
    finally:
        db.close()
