"""PACS outage: the node backs off exponentially with jitter, keeps its outbox across a kill -9,
delivers when the PACS is back, dead-letters after `delivery.dead_letter_after_s`, and a resend
through the API delivers the dead-lettered result. The spool of each series is cleaned (tiny
`retention_hours`) only after its result is delivered, never while it is dead-lettered.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, free_port, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

INITIAL_S, MAX_S, DEAD_S = 0.5, 4.0, 20.0
SLICES = 16


def send(node: RunningNode, folder: Path, seed: int) -> tuple[str, str]:
    paths = write_ct_series(folder, finding="none", slices=SLICES, seed=seed)
    sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
    assert sent.returncode == 0, sent.output
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


def delivery(node: RunningNode, study_uid: str) -> dict | None:
    study = node.study(study_uid)
    dicom = [d for d in (study or {}).get("deliveries", []) if d["kind"] == "dicom"]
    return dicom[0] if dicom else None


def observe_retries(node: RunningNode, study_uid: str, until_attempts: int) -> list[tuple[int, float]]:
    """(attempt number, delay the node chose after it) for each failed attempt seen."""
    seen: dict[int, float] = {}

    def enough():
        d = delivery(node, study_uid)
        if d and d["attempts"] and d["attempts"] not in seen and d["state"] == "pending":
            seen[d["attempts"]] = d["next_attempt_at"] - time.time()
        return d and d["attempts"] >= until_attempts

    poll(enough, 60, 0.05, f"{until_attempts} delivery attempts")
    return sorted(seen.items())


def spool_files(node: RunningNode, study_uid: str, series_uid: str) -> list[Path]:
    return sorted((node.var / "spool" / study_uid / series_uid).glob("*.dcm"))


def purged_rows(node: RunningNode, series_uid: str) -> tuple[int, int]:
    db = sqlite3.connect(f"file:{node.var / 'state.sqlite'}?mode=ro", uri=True)
    try:
        total, purged = db.execute(
            "SELECT COUNT(*), COUNT(purged_at) FROM instances WHERE series_uid=?",
            (series_uid,)).fetchone()
    finally:
        db.close()
    return total, purged


def test_pacs_outage_backs_off_survives_kill_dead_letters_and_resends(tmp_path):
    pacs_port = free_port()  # nothing listens here until the PACS "comes back"
    node = RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs_port}",
                       retention_hours=0.0003,
                       delivery={"initial_backoff_s": INITIAL_S, "max_backoff_s": MAX_S,
                                 "dead_letter_after_s": DEAD_S})
    node.start()
    try:
        study_a, series_a = send(node, tmp_path / "a", 9501)

        # Exponential backoff with jitter: each delay lies in 0.5x..1.5x of its doubling base.
        retries = observe_retries(node, study_a, until_attempts=4)
        assert len(retries) >= 3, retries
        for attempt, delay in retries:
            base = min(MAX_S, INITIAL_S * 2 ** (attempt - 1))
            assert 0.5 * base - 0.3 <= delay <= 1.5 * base + 0.05, (attempt, delay, retries)
        assert any(abs(delay / min(MAX_S, INITIAL_S * 2 ** (n - 1)) - 1) > 0.05
                   for n, delay in retries), f"no jitter in {retries}"
        before_kill = delivery(node, study_a)
        assert before_kill["state"] == "pending"
        assert f"PACS@127.0.0.1:{pacs_port}" in before_kill["last_error"]

        # kill -9 during the outage: the outbox row survives with its attempt count.
        node.kill()
        node.start()
        after = delivery(node, study_a)
        assert after["id"] == before_kill["id"] and after["attempts"] >= before_kill["attempts"]
        poll(lambda: delivery(node, study_a)["attempts"] > before_kill["attempts"], 30, 0.2,
             "retries after the restart")

        # Past dead_letter_after_s: dead letter, shown as "delivery failed" with the reason.
        dead = node.wait_study_state(study_a, {"delivery failed"}, timeout=DEAD_S + 3 * MAX_S)
        assert f"PACS@127.0.0.1:{pacs_port}" in dead["reason"]
        assert delivery(node, study_a)["state"] == "dead"
        assert len(spool_files(node, study_a, series_a)) == SLICES  # not cleaned while dead

        # A second result waits in the outbox, and goes out by itself once the PACS is back.
        study_b, series_b = send(node, tmp_path / "b", 9502)
        poll(lambda: (delivery(node, study_b) or {}).get("attempts", 0) >= 1, 60, 0.2,
             "first failed attempt of study B")
        with StoreSCP(tmp_path / "pacs", ae="PACS", port=pacs_port, extra_args=PACS_ARGS) as pacs:
            node.wait_study_state(study_b, {"delivered"}, timeout=3 * MAX_S)
            assert node.study(study_a)["state"] == "delivery failed"
            assert sr_files(pacs.directory, study_a) == []

            status, body = node.api(f"/deliveries/{dead['deliveries'][0]['id']}/resend",
                                    method="POST")
            assert status == 202, body
            node.wait_study_state(study_a, {"delivered"}, timeout=30)
            for study in (study_a, study_b):
                assert len(sr_files(pacs.directory, study)) == 1, sr_files(pacs.directory, study)

        # Retention: delivered series lose their spool files; the DB keeps their rows.
        for study, series in ((study_a, series_a), (study_b, series_b)):
            poll(lambda s=study, r=series: not spool_files(node, s, r), 30, 0.2,
                 f"spool of {series} cleaned")
            assert purged_rows(node, series) == (SLICES, SLICES)
            assert node.study(study)["instance_count"] == SLICES
    finally:
        node.stop()
