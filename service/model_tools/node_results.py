"""Studies through the real path: a node with one model, C-STORE in, the result SR read back
from the storescp PACS it delivers to (pipelines/sr_reading.py reads it).

Every study is sent first (one association each), then the results are collected as they
arrive, so the node works while the next study is being sent, as it would in a hospital.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from pipelines.model_card import ModelCard
from pipelines.sr_reading import read_result_sr
from service.config import Destination
from service.dicom_sender import send_files
from service.model_tools.local_peers import NodeProcess, StoreScp, only_model, poll, stop_groups
from service.model_tools.study_set import Study

FINAL_STATES = {"delivered", "not analysed", "delivery failed"}
SR_GRACE_S = 15.0  # a finished study's SR may trail its state by a delivery attempt or two


@dataclass(frozen=True)
class Outcome:
    """One study's result as the PACS received it."""

    study_uid: str
    analysed: bool
    present: bool | None = None
    probability: float | None = None  # P(finding present): the SR's certainty of its verdict, turned
    reason: str = ""
    sr_uid: str = ""
    seconds: float | None = None  # association end -> result at the PACS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outcome(study_uid: str, sr: pydicom.Dataset, seconds: float | None) -> Outcome:
    result = read_result_sr(sr)
    if not result["analysed"]:
        return Outcome(study_uid, False, reason=result["not_analysed_reason"] or "not analysed",
                       sr_uid=result["sop_instance_uid"], seconds=seconds)
    certainty = result["certainty"]
    present = bool(result["present"])
    probability = None if certainty is None else (certainty if present else 1.0 - certainty)
    return Outcome(study_uid, True, present, probability, sr_uid=result["sop_instance_uid"], seconds=seconds)


class PacsFolder:
    """The SRs storescp wrote, by study UID; each file is read once, when complete."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: set[str] = set()
        self.by_study: dict[str, pydicom.Dataset] = {}

    def refresh(self) -> None:
        for path in sorted(self.folder.iterdir()):
            if path.name in self.seen or not path.name.startswith("SR"):
                continue
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, EOFError, OSError, ValueError):
                continue  # storescp is still writing it
            self.seen.add(path.name)
            self.by_study[str(ds.StudyInstanceUID)] = ds


def run_models(models: list[tuple[str, ModelCard]], studies: list[Study], provider: str, timeout: float,
               progress: Any = None) -> dict[str, tuple[dict[str, Outcome], dict[str, Any]]]:
    """Each model's outcome for every study, each model alone in its own node (two versions of
    one model may not run side by side in one node); the nodes start and work at the same time.
    Returns {key: (outcomes by study UID, how the run went)}."""
    with tempfile.TemporaryDirectory(prefix="befund-evaluate-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        started = time.monotonic()
        runs: list[_Run] = []
        stack.callback(lambda: stop_groups([run.node.proc for run in runs if run.node.proc is not None]))
        for n, (key, card) in enumerate(models):
            pacs = stack.enter_context(StoreScp(work / f"pacs{n}"))
            node = NodeProcess(work / f"node{n}", only_model(card.folder, work / f"models{n}"), pacs.address,
                               provider=provider)
            runs.append(_Run(key, node.launch(), PacsFolder(pacs.directory)))
        for run in runs:
            run.node.wait_ready()
            run.how["node_ready_s"] = round(time.monotonic() - started, 1)
        for run in runs:
            run.send(studies)
        try:
            poll(lambda: all([run.collect(progress) for run in runs]), timeout,
                 f"results for {len(studies)} studies", 0.25)
        except TimeoutError:
            for run in runs:
                for uid in run.sent_at:
                    run.outcomes.setdefault(uid, Outcome(uid, False,
                                                         reason=f"no result within {timeout:.0f} s"))
        for run in runs:
            run.how["seconds"] = round(time.monotonic() - started, 1)
    return {run.key: (run.outcomes, run.how) for run in runs}


class _Run:
    """One model's node, what was sent to it and what came back."""

    def __init__(self, key: str, node: NodeProcess, pacs: PacsFolder):
        self.key, self.node, self.pacs = key, node, pacs
        self.sent_at: dict[str, float] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.final_seen: dict[str, float] = {}
        self.how: dict[str, Any] = {"model": key}
        self.expected = 0

    def send(self, studies: list[Study]) -> None:
        dest = Destination.parse(f"BEFUND@127.0.0.1:{self.node.dicom_port}")
        self.expected = len(studies)
        for study in studies:
            _, failed = send_files(study.files, dest, calling_ae="BEFUNDEVAL", progress=False)
            if failed:
                self.outcomes[study.uid] = Outcome(
                    study.uid, False,
                    reason=f"refused by the node at C-STORE: {len(failed)} instance(s), e.g. {failed[0][1]}")
            else:
                self.sent_at[study.uid] = time.time()

    def collect(self, progress: Any) -> bool:
        """Read what arrived; True when every study has its outcome."""
        self.pacs.refresh()
        for uid in [u for u in self.sent_at if u not in self.outcomes]:
            sr = self.pacs.by_study.get(uid)
            if sr is not None:
                self.outcomes[uid] = _outcome(uid, sr, round(time.time() - self.sent_at[uid], 3))
            else:
                row = self.node.study(uid)
                if not row or row["state"] not in FINAL_STATES - {"delivered"}:
                    continue
                # finished without a result at the PACS yet: the not-analysed SR of a job may
                # still be on its way; a series no model took has no job and gets none
                first = self.final_seen.setdefault(uid, time.monotonic())
                if row.get("jobs") and time.monotonic() - first < SR_GRACE_S:
                    continue
                self.outcomes[uid] = Outcome(uid, False, reason=f"{row['state']}: {row['reason']}")
            if progress is not None:
                progress.update(1)
        return len(self.outcomes) >= self.expected
