"""A late instance after retention removed the series' files: the radiologist is told why the
new run could not analyse the series and what the earlier run found; resending the whole
series analyses it again.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from phantoms.ct_head import write_ct_series
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import RunningNode, poll
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")


def _send(node: RunningNode, paths: list[Path]) -> None:
    sent = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=120)
    assert sent.returncode == 0, sent.output


def _wait(node: RunningNode, study: str, ok, what: str) -> dict:
    def check():
        s = node.study(study)
        return s if s and ok(s) else None

    try:
        return poll(check, 120, 0.2, what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last: {node.study(study)}\n{node.log_tail()}") from exc


def test_late_instance_after_retention_says_why_and_a_full_resend_analyses_again(tmp_path):
    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=PACS_ARGS) as pacs, \
            RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs.port}",
                        retention_hours=0.0003) as node:
        everything = write_ct_series(tmp_path / "series", finding="subdural", slices=17, seed=5150)
        paths, late_path = everything[:16], everything[16]  # the last slice comes late
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        study, series = first.StudyInstanceUID, first.SeriesInstanceUID
        _send(node, paths)
        done = node.wait_study_state(study, {"delivered"}, timeout=120)
        assert done["present"] is True and done["run"] == 1
        spooled = node.var / "spool" / study / series
        poll(lambda: not any(p.suffix == ".dcm" for p in spooled.iterdir()), 60, 0.2,
             "retention removing the series' files")

        _send(node, [late_path])
        second = _wait(node, study, lambda s: s["state"] == "not analysed" and any(
            j["run"] == 2 and j["state"] == "not_analysed" for j in s["jobs"]), "run 2 not analysed")
        assert second["instance_count"] == 17
        assert "removed from the spool by retention" in second["reason"], second
        assert "Run 1 found the finding present" in second["reason"], second
        # The flag of run 1 still stands on the worklist: a failed later attempt hides no finding.
        assert (second["present"], second["priority"], second["run"]) == (True, "high", 1)

        _send(node, [*paths, late_path])  # the whole series again
        third = _wait(node, study, lambda s: s["run"] == 3 and s["state"] == "delivered",
                      "run 3 delivered")
        assert third["present"] is True
        assert len(sr_files(pacs.directory, study)) == 3  # run 1, run 2 (not analysed), run 3
