"""`befund model check|bench|evaluate`: what an ML engineer runs on a model folder.

check runs in-process on the reference models and on broken copies; bench starts the real
model service beside raw onnxruntime; evaluate sends phantom studies through a real node to a
DCMTK storescp and reads the SRs back, once per model (--compare: a second node).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.model_card import load_card, sha256_of
from service.cli import main
from service.model_tools import diagnostic_stats as st

ROOT = Path(__file__).resolve().parent.parent
ICH = ROOT / "models" / "ich_ct"


def befund_model(*args: str) -> int:
    return main(["model", *args])


def broken_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(ICH, folder)
    card = folder / "card.yaml"
    card.write_text(edit(card.read_text()))
    return folder


def fail_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL  ")]


@pytest.mark.parametrize("model", ["ich_ct", "tumor_wsi", "ich_seg"])
def test_check_passes_on_the_reference_models(model, tmp_path, capsys):
    assert befund_model("check", str(ROOT / "models" / model), "--out", str(tmp_path / "r")) == 0
    out = capsys.readouterr().out
    assert not fail_lines(out), out
    assert "ok    smoke CPU" in out and "ok    opset: 17" in out
    report = json.loads((tmp_path / "r" / "check.json").read_text())
    assert report["ok"] is True
    prov = report["provenance"]
    assert prov["model"]["file_sha256"] == load_card(ROOT / "models" / model).sha256
    assert prov["cpu_cores_usable"] >= 1 and prov["cpu_model"] and prov["befund_version"]
    assert prov["onnxruntime_providers_used"] == ["CPUExecutionProvider"]
    assert (tmp_path / "r" / "check.png").stat().st_size > 5000


@pytest.mark.parametrize("edit, expected", [
    (lambda t: re.sub(r'(?m)^sha256:.*$', 'sha256: "' + "0" * 64 + '"', t),
     r"^FAIL  sha256: model\.onnx has dca567b0\w+, the card says 0{64}"),
    (lambda t: t.replace("postprocessing:\n", "postprocessing:\n  treshold: 0.4\n", 1),
     r"^FAIL  card fields: unknown key postprocessing\.treshold \(known in postprocessing: aggregation, "
     r"key_images, priority_when_positive, threshold\)$"),
    (lambda t: t.replace("  name: slices\n", "  name: ct_slices\n", 1),
     r"^FAIL  input name: card input\.name is 'ct_slices', the ONNX inputs are \['slices'\]$"),
], ids=["wrong sha256", "unknown key", "wrong input name"])
def test_check_names_what_is_wrong_in_a_broken_copy(edit, expected, tmp_path, capsys):
    folder = broken_copy(tmp_path, edit)
    assert befund_model("check", str(folder), "--out", str(tmp_path / "r")) == 1
    failed = fail_lines(capsys.readouterr().out)
    assert re.match(expected, failed[0]), failed
    if "input name" not in expected:
        assert len(failed) == 1, failed  # exactly the one defect, nothing else complains
    report = json.loads((tmp_path / "r" / "check.json").read_text())
    assert report["ok"] is False


def test_fix_sha256_rewrites_only_the_sha_line(tmp_path, capsys):
    folder = broken_copy(tmp_path, lambda t: re.sub(r'(?m)^sha256:.*$', 'sha256: "' + "0" * 64 + '"', t))
    before = (folder / "card.yaml").read_text()
    assert befund_model("check", str(folder), "--fix-sha256", "--out", str(tmp_path / "r")) == 0
    after = (folder / "card.yaml").read_text()
    assert f'sha256: "{sha256_of(folder / "model.onnx")}"' in after
    assert [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b] == \
        ['sha256: "' + "0" * 64 + '"']  # comments and every other line as written
    assert not fail_lines(capsys.readouterr().out)


def test_generated_resnet_fits_ct_slices_and_its_flops_are_counted(tmp_path, capsys):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "resnet_model.py"), "--out",
                    str(tmp_path / "net"), "--tiny"], check=True, capture_output=True)
    assert befund_model("check", str(tmp_path / "net"), "--out", str(tmp_path / "r")) == 0
    assert not fail_lines(capsys.readouterr().out)
    from service.model_tools.onnx_graph import flops_per_item

    flops = flops_per_item(tmp_path / "net" / "model.onnx")
    assert flops["nodes_not_counted"] == [] and 1e7 < flops["flops"] < 1e9  # tiny: ~0.1 GFLOP


def test_bench_cuda_without_a_gpu_says_so(tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert befund_model("bench", str(ICH), "--provider", "cuda", "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "--provider cuda:" in err and "CUDAExecutionProvider" in err and "--provider cpu" in err


def test_bench_compares_raw_onnxruntime_with_the_model_service(tmp_path, capsys):
    assert befund_model("bench", str(ICH), "--batches", "1,4", "--concurrency", "1,2", "--seconds", "0.3",
                        "--skip-e2e", "--out", str(tmp_path / "r")) == 0
    report = json.loads((tmp_path / "r" / "bench.json").read_text())
    cells = {(r["batch"], r["concurrency"]): r for r in report["model_only"]}
    assert set(cells) == {(1, 1), (1, 2), (4, 1), (4, 2)}
    for row in cells.values():
        for side in ("raw", "service"):
            t = row[side]
            assert t["calls"] >= 1 and t["items_per_s"] > 0 and t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"]
        assert row["ratio_service_to_raw"] == pytest.approx(
            row["service"]["items_per_s"] / row["raw"]["items_per_s"], rel=0.01)
    a = report["arithmetic"]
    assert a["sgemm"]["gflops"] > 0 and a["flops_per_item"] == pytest.approx(35.39e6, rel=0.01)
    prov = report["provenance"]
    assert prov["model"]["file_sha256"] == load_card(ICH).sha256
    assert prov["onnxruntime_providers_used"][0] == "CPUExecutionProvider" and prov["onnxruntime_version"]
    assert (tmp_path / "r" / "bench.png").stat().st_size > 10000


# --- evaluate ------------------------------------------------------------------------------------

SEEDS = {"subdural": (101, 102), "epidural": (103,), "none": (201, 202, 203)}


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory):
    """Six head-CT phantoms as `befund phantom ct` writes them (with phantom.json)."""
    data = tmp_path_factory.mktemp("studies")
    for finding, seeds in SEEDS.items():
        for seed in seeds:
            assert main(["phantom", "ct", "--out", str(data / f"{finding}-{seed}"), "--finding", finding,
                         "--slices", "20", "--seed", str(seed)]) == 0
    # and one the model cannot take (3 slices; it needs 16): listed, never scored as negative
    assert main(["phantom", "ct", "--out", str(data / "short"), "--finding", "none", "--slices", "3",
                 "--seed", "301"]) == 0
    return data


def test_labels_come_from_the_csv_and_phantom_truth(phantom_studies, tmp_path):
    from service.model_tools.study_set import apply_labels, collect_studies, labelled

    studies, notes = collect_studies(phantom_studies)
    assert len(studies) == 7 and notes == []
    truth = {s.subgroups["finding"]: s.label for s in studies.values()}
    assert truth == {"subdural": True, "epidural": True, "none": False}
    assert all({"slice_thickness", "scanner", "site"} <= set(s.subgroups) for s in studies.values())
    uid = sorted(studies)[0]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["study_uid", "label", "reader"], [uid, "absent", "R1"],
                                 ["1.2.3", "1", "R2"]])
    notes = apply_labels(studies, tmp_path / "labels.csv")
    have, missing = labelled(studies)
    assert [s.uid for s in have] == [uid] and have[0].label is False and have[0].subgroups["reader"] == "R1"
    assert notes == ["1 CSV row(s) name studies that are not under --data"]
    assert missing == ["6 study(ies) without a label were left out"]


def test_evaluate_sends_phantoms_through_a_node_and_compares_a_copy(phantom_studies, tmp_path, capsys):
    copy = tmp_path / "ich_ct_low_threshold"
    shutil.copytree(ICH, copy)
    card = copy / "card.yaml"
    card.write_text(card.read_text().replace("postprocessing:\n  aggregation: top3_mean\n  threshold: 0.5",
                                             "postprocessing:\n  aggregation: top3_mean\n  threshold: 0.005"))
    # the normal phantoms score ~0.01: under the copy's threshold they are flagged
    assert befund_model("evaluate", str(ICH), "--data", str(phantom_studies), "--compare", str(copy),
                        "--bootstrap", "200", "--out", str(tmp_path / "r")) == 0
    report = json.loads((tmp_path / "r" / "evaluate.json").read_text())
    f = report["figures"]
    assert f["studies"] == 7 and f["analysed"] == 6
    [short] = f["not_analysed"]
    assert "3" in short["reason"] and "16" in short["reason"], short
    assert f["confusion"] == {"tp": 3, "fp": 0, "tn": 3, "fn": 0}
    assert f["sensitivity"] == {"value": 1.0, "ci95": [0.4385, 1.0], "k": 3, "n": 3}  # Wilson, 3 of 3
    assert f["specificity"]["value"] == f["ppv"]["value"] == f["npv"]["value"] == 1.0
    assert f["roc_auc"]["value"] == 1.0 and f["roc_auc"]["bootstrap_resamples"] == 200
    assert 0.0 <= f["calibration"]["ece"] < 0.05
    assert f["subgroups"]["finding"]["epidural"]["sensitivity"]["n"] == 1
    assert set(f["subgroups"]) >= {"finding", "slice_thickness", "scanner", "site"}
    b = report["compare"]
    assert b["figures"]["confusion"] == {"tp": 3, "fp": 3, "tn": 0, "fn": 0}
    agree = b["agreement"]
    assert agree["agreement"] == 0.5 and agree["cohen_kappa"] == 0.0
    assert agree["flag_rate_a"] == 0.5 and agree["flag_rate_b"] == 1.0 and agree["flag_rate_change"] == 0.5
    assert sorted(flip["subgroup_finding"] for flip in agree["flips"]) == ["none"] * 3
    assert all(flip["a_present"] is False and flip["b_present"] is True for flip in agree["flips"])
    assert report["provenance"]["model"]["key"] == "ich_ct@0.1.0"
    for png in ("evaluation.png", "evaluation-compare.png", "compare.png"):
        assert (tmp_path / "r" / png).stat().st_size > 10000
    rows = list(csv.DictReader(open(tmp_path / "r" / "studies.csv")))
    assert len(rows) == 7 and {r["model2_present"] for r in rows if r["model2_not_analysed"] == ""} == {"1"}
    assert "flips" in capsys.readouterr().out


def test_diagnostic_figures_match_known_values():
    assert st.wilson(9, 10)["ci95"] == [0.5958, 0.9821]  # Wilson 1927 / Newcombe 1998, case 1
    assert st.wilson(0, 0) is None
    labels = np.array([1, 1, 1, 0, 0, 0], bool)
    assert st.auc(labels, np.array([0.9, 0.8, 0.4, 0.5, 0.1, 0.2])) == pytest.approx(8 / 9)
    assert st.auc(labels, np.full(6, 0.5)) == 0.5  # ties count half
    assert st.cohen_kappa(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)) == 0.5
    cal = st.calibration(np.array([1, 0, 1, 0], bool), np.array([0.9, 0.1, 0.6, 0.6]), bins=10)
    assert cal["ece"] == pytest.approx((0.1 + 0.1 + 2 * 0.1) / 4)


def test_every_model_command_option_shows_its_default_in_help():
    from service.cli import build_parser

    model = build_parser()._subparsers._group_actions[0].choices["model"]  # noqa: SLF001
    for name, sub in model._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        text = " ".join(sub.format_help().split())
        for action in sub._actions:  # noqa: SLF001
            if action.option_strings and action.dest != "help":
                shown = text[text.index(action.option_strings[-1], text.index("options:")):]
                assert "default" in shown.split(" --")[0], f"befund model {name} {action.option_strings[-1]}"
