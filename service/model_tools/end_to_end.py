"""End-to-end time to result for `befund model bench`: a generated study of the model's kind
through a real node (C-STORE in, SR accepted by a storescp PACS), stage by stage.

Which study to generate follows the card's selector, not its task name: a model that takes
CT gets a head-CT phantom, one that takes slide microscopy (SM) a phantom slide, so a new
task that reads CT or slides needs nothing here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipelines.model_card import ModelCard
from service.config import Destination
from service.dicom_sender import send_folder
from service.model_tools.local_peers import NodeProcess, StoreScp, only_model, poll

FINAL_STATES = {"delivered", "not analysed", "delivery failed"}


def phantom_kind(card: ModelCard) -> str | None:
    """"ct" or "wsi": the phantom the card's selector takes; None when befund has none for it."""
    modalities = set(card.selector.modality)
    if not modalities or "CT" in modalities:
        return "ct"
    return "wsi" if "SM" in modalities else None


def write_study(kind: str, folder: Path, seed: int, slices: int) -> Path:
    """A phantom study of `kind` (a bleed, or tumor, so that the whole result path runs)."""
    if kind == "ct":
        from phantoms.ct_head import write_ct_series

        write_ct_series(folder, finding="subdural", slices=slices, seed=seed)
    else:
        from phantoms.wsi_slide import write_wsi_slide

        write_wsi_slide(folder, width=4096, height=3072, tumor=0.2, seed=seed)
    return folder


def time_to_result(card: ModelCard, provider: str, slices: int, runs: int,
                   progress: Any = None) -> dict[str, Any]:
    """One warm-up study, then `runs` studies through one node; seconds from series complete
    (and from the sender's association end) to the result accepted by the PACS."""
    with tempfile.TemporaryDirectory(prefix="befund-bench-") as tmp:
        work = Path(tmp)
        kind = phantom_kind(card)
        if kind is None:
            return {"skipped": f"befund has no phantom of modality {list(card.selector.modality)}"}
        models = only_model(card.folder, work / "models")
        with StoreScp(work / "pacs") as pacs, \
                NodeProcess(work / "node", models, pacs.address, provider=provider) as node:
            out = []
            for i in range(runs + 1):
                folder = write_study(kind, work / f"study{i}", 7000 + i, slices)
                out.append(_one_run(node, folder, warmup=(i == 0)))
                if progress is not None:
                    progress.update(1)
    measured = [r for r in out if not r["warmup"]]
    delivered = sorted(r["complete_to_delivered_s"] for r in measured
                       if r.get("complete_to_delivered_s") is not None)
    return {"runs": out, "study": f"{slices}-slice head CT, subdural bleed" if kind == "ct"
            else "4096 x 3072 px phantom slide, 20 % tumor",
            "median_complete_to_delivered_s": round(float(np.median(delivered)), 3) if delivered else None,
            "best_complete_to_delivered_s": delivered[0] if delivered else None}


def _one_run(node: NodeProcess, folder: Path, warmup: bool) -> dict[str, Any]:
    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    sent, failed = send_folder(folder, Destination.parse(f"BEFUND@127.0.0.1:{node.dicom_port}"),
                               calling_ae="BEFUNDBENCH", progress=False)
    if failed:
        raise RuntimeError(f"the node refused {len(failed)} instance(s): {failed[0][1]}")
    association_end = time.time()
    row = poll(lambda: (s := node.study(study_uid)) and s["state"] in FINAL_STATES and s, 600,
               f"a result for study {study_uid}")
    completed = node.series_completed_at(study_uid)
    delivered = [d["delivered_at"] for d in row["deliveries"] if d.get("delivered_at")]
    job = row["jobs"][-1] if row["jobs"] else {}
    out: dict[str, Any] = {"warmup": warmup, "study_uid": study_uid, "instances": sent,
                           "state": row["state"], "present": row.get("present"),
                           "stages_s": {k: round(v, 3) for k, v in (job.get("timings") or {}).items()}}
    if delivered and completed:
        out["complete_to_delivered_s"] = round(max(delivered) - completed, 3)
        out["association_end_to_delivered_s"] = round(max(delivered) - association_end, 3)
    else:
        out["reason"] = row.get("reason") or "no delivery"
    return out
