"""Load: 8 concurrent senders x 5 studies each; all 40 analysed and delivered, none lost, each
exactly one SR at the PACS. The driver is `benchmarks/load.py`, which also reports the figures."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.load import make_studies, send_all, summarise, wait_all_final
from tests.dicom_peers import StoreSCP, have_dcmtk
from tests.node_harness import RunningNode
from tests.pacs_results import PACS_ARGS, sr_files

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK is not installed")

SENDERS, STUDIES_EACH, SLICES = 8, 5, 16


def test_eight_concurrent_senders_all_forty_studies_delivered_once(tmp_path):
    studies = make_studies(tmp_path / "studies", SENDERS * STUDIES_EACH, SLICES)
    with StoreSCP(tmp_path / "pacs", ae="PACS", extra_args=PACS_ARGS) as pacs, \
            RunningNode(tmp_path / "node", pacs=f"PACS@127.0.0.1:{pacs.port}",
                        job_workers=2) as node:
        send_all(node, studies, SENDERS)
        assert all(s.returncode == 0 for s in studies), [s.output for s in studies if s.returncode]
        wait_all_final(node, studies, timeout=240)
        for s in studies:
            assert s.result["state"] == "delivered", (s.index, s.result.get("state"),
                                                      s.result.get("reason"))
            assert s.result["instance_count"] == SLICES
            assert s.result["present"] is not None  # analysed, not "not analysed"
            assert [j["run"] for j in s.result["jobs"]] == [1]
        per_study = Counter(study for _, study, _ in sr_files(pacs.directory))
        assert per_study == Counter({s.study_uid: 1 for s in studies})
        summary = summarise(studies, pacs.directory, SENDERS, SLICES)
        assert summary["delivered"] == summary["sr_files_at_pacs"] == SENDERS * STUDIES_EACH
