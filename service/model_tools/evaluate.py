"""`befund model evaluate DIR --data DIR [--labels CSV] [--compare OTHER_DIR]`.

Every labelled study goes through the real path (service/model_tools/node_results.py); the
figures are computed from the SRs the PACS received, so they describe what a radiologist
would have been shown, calibration and validated-domain refusals included. A study the node
did not analyse is counted and listed with its reason, never scored as negative.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.model_card import CardError, ModelCard, load_card
from service.model_tools import diagnostic_stats as st
from service.model_tools.node_results import Outcome, run_models
from service.model_tools.provenance import provenance, report_folder, write_json
from service.model_tools.providers import PROVIDERS, provider_problem
from service.model_tools.study_set import (
    Study,
    apply_labels,
    collect_studies,
    labelled,
    subgroup_keys,
    subgroup_rows,
)


def figures(studies: list[Study], outcomes: dict[str, Outcome], bootstrap: int) -> dict[str, Any]:
    """Every figure of one model over the studies it analysed."""
    analysed = [s for s in studies if outcomes[s.uid].analysed]
    not_analysed = [{"study_uid": s.uid, "reason": outcomes[s.uid].reason}
                    for s in studies if not outcomes[s.uid].analysed]
    labels = np.array([s.label for s in analysed], bool)
    predicted = np.array([bool(outcomes[s.uid].present) for s in analysed], bool)
    scored = [s for s in analysed if outcomes[s.uid].probability is not None]
    score_labels = np.array([s.label for s in scored], bool)
    scores = np.array([outcomes[s.uid].probability for s in scored], float)
    out: dict[str, Any] = {
        "studies": len(studies), "analysed": len(analysed), "not_analysed": not_analysed,
        **st.binary_figures(labels, predicted),
        "roc_auc": st.auc_with_interval(score_labels, scores, bootstrap),
        "roc_curve": st.roc_points(score_labels, scores) if len(scored) else None,
        "calibration": st.calibration(score_labels, scores),
        "flag_rate": round(float(predicted.mean()), 4) if len(predicted) else None,
        "subgroups": {},
    }
    for key in subgroup_keys(analysed):
        out["subgroups"][key] = {}
        for value, members in sorted(subgroup_rows(analysed, key).items()):
            lab = np.array([s.label for s in members], bool)
            pred = np.array([bool(outcomes[s.uid].present) for s in members], bool)
            f = st.binary_figures(lab, pred)
            out["subgroups"][key][value] = {"n": len(members), "positives": int(lab.sum()),
                                            "sensitivity": f["sensitivity"], "specificity": f["specificity"],
                                            "accuracy": f["accuracy"]}
    return out


def comparison(studies: list[Study], a: dict[str, Outcome], b: dict[str, Outcome]) -> dict[str, Any]:
    """Agreement of two models on the studies both analysed, and the studies that flip."""
    both = [s for s in studies if a[s.uid].analysed and b[s.uid].analysed]
    va = np.array([bool(a[s.uid].present) for s in both], bool)
    vb = np.array([bool(b[s.uid].present) for s in both], bool)
    flips = [{"study_uid": s.uid, "label": s.label, **{f"subgroup_{k}": v for k, v in s.subgroups.items()},
              "a_present": a[s.uid].present, "a_probability": a[s.uid].probability,
              "b_present": b[s.uid].present, "b_probability": b[s.uid].probability,
              "b_correct": b[s.uid].present == s.label}
             for s, x, y in zip(both, va, vb, strict=True) if x != y]
    analysed_changed = [{"study_uid": s.uid, "a": a[s.uid].reason or "analysed",
                         "b": b[s.uid].reason or "analysed"}
                        for s in studies if a[s.uid].analysed != b[s.uid].analysed]
    return {"both_analysed": len(both),
            "agreement": round(float(np.mean(va == vb)), 4) if len(both) else None,
            "cohen_kappa": st.cohen_kappa(va, vb),
            "flag_rate_a": round(float(va.mean()), 4) if len(both) else None,
            "flag_rate_b": round(float(vb.mean()), 4) if len(both) else None,
            "flag_rate_change": round(float(vb.mean() - va.mean()), 4) if len(both) else None,
            "flips": flips, "analysed_in_one_only": analysed_changed}


def _load(folder: str) -> ModelCard:
    try:
        return load_card(folder)
    except CardError as exc:
        raise ValueError(f"{exc} (befund model check {folder} says more)") from exc


def run_evaluate(args: argparse.Namespace) -> int:
    problem = provider_problem(args.provider)
    if problem:
        print(f"befund: {problem}", file=sys.stderr)
        return 2
    card = _load(args.folder)
    other = _load(args.compare) if args.compare else None
    studies_by_uid, notes = collect_studies(Path(args.data))
    if args.labels:
        notes += apply_labels(studies_by_uid, Path(args.labels))
    studies, more = labelled(studies_by_uid)
    notes += more
    if not studies:
        print(f"befund: no labelled study under {args.data}: give --labels CSV (study_uid,label) or "
              "phantom folders written by `befund phantom`", file=sys.stderr)
        return 2
    for note in notes:
        print(f"befund: {note}")
    out = report_folder(args.out, "evaluate", card.name)
    from tqdm import tqdm

    models = [(card.key, card)]
    if other is not None:
        same = other.key == card.key  # a copy: named by its folder
        models.append((f"{other.key} ({Path(args.compare).name})" if same else other.key, other))
    with tqdm(total=len(studies) * len(models), unit="study", desc="results") as bar:
        results = run_models(models, studies, args.provider, args.timeout, bar)
    runs = {key: (model, *results[key]) for key, model in models}
    (key_a, (_, out_a, how_a)), *rest = runs.items()
    used = [PROVIDERS[args.provider]]
    report: dict[str, Any] = {
        "command": "evaluate", "model": key_a, "data": str(Path(args.data).resolve()),
        "labels": str(Path(args.labels).resolve()) if args.labels else "phantom ground truth",
        "notes": notes, "run": how_a, "figures": figures(studies, out_a, args.bootstrap),
        "provenance": provenance(card, used),
    }
    if rest:
        key_b, (model_b, out_b, how_b) = rest[0]
        report["compare"] = {"model": key_b, "folder": str(Path(args.compare).resolve()), "run": how_b,
                             "figures": figures(studies, out_b, args.bootstrap),
                             "agreement": comparison(studies, out_a, out_b),
                             "provenance": provenance(model_b, used)}
    write_json(out / "evaluate.json", report)
    _write_studies_csv(out / "studies.csv", studies, runs)
    from service.model_tools.evaluate_plot import plot_compare, plot_evaluation

    plot_evaluation(report["figures"], key_a, out / "evaluation.png")
    if rest:
        plot_evaluation(report["compare"]["figures"], report["compare"]["model"],
                        out / "evaluation-compare.png")
        plot_compare(studies, out_a, out_b, key_a, report["compare"]["model"], out / "compare.png")
    _print_summary(report)
    print(f"report in {out}")
    return 0


def _write_studies_csv(path: Path, studies: list[Study], runs: dict[str, Any]) -> None:
    keys = subgroup_keys(studies)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["study_uid", "label", *keys]
        for n in range(len(runs)):
            head += [f"model{n + 1}_present", f"model{n + 1}_probability", f"model{n + 1}_not_analysed"]
        w.writerow(head)
        for s in studies:
            row = [s.uid, int(bool(s.label)), *(s.subgroups.get(k, "") for k in keys)]
            for _, outcomes, _ in runs.values():
                o = outcomes[s.uid]
                row += ["" if o.present is None else int(o.present),
                        "" if o.probability is None else round(o.probability, 4), o.reason]
            w.writerow(row)


def _fmt(p: dict[str, Any] | None) -> str:
    return "n/a" if p is None else f"{p['value']:.3f} ({p['ci95'][0]:.3f}-{p['ci95'][1]:.3f})"


def _print_summary(report: dict[str, Any]) -> None:
    blocks = [(report["model"], report["figures"])]
    if "compare" in report:
        blocks.append((report["compare"]["model"], report["compare"]["figures"]))
    for key, f in blocks:
        c = f["confusion"]
        print(f"{key}: {f['analysed']} of {f['studies']} studies analysed; TP {c['tp']} FP {c['fp']} "
              f"TN {c['tn']} FN {c['fn']}")
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            print(f"  {name:<12} {_fmt(f[name])}")
        print(f"  {'ROC AUC':<12} {_fmt(f['roc_auc'])}   ECE {f['calibration']['ece']}")
        for n in f["not_analysed"]:
            print(f"  not analysed {n['study_uid']}: {n['reason']}")
    if "compare" in report:
        a = report["compare"]["agreement"]
        print(f"agreement {a['agreement']}, Cohen's kappa {a['cohen_kappa']}, flag rate "
              f"{a['flag_rate_a']} -> {a['flag_rate_b']} ({a['flag_rate_change']:+}), "
              f"{len(a['flips'])} flip(s)" if a["agreement"] is not None else "no study analysed by both")
        for flip in a["flips"]:
            print(f"  flips {flip['study_uid']}: label {flip['label']}, "
                  f"{flip['a_present']} -> {flip['b_present']}")
