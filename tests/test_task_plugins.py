"""A task is a plugin: the registry's errors, and a task defined only in the test tree
(tests/toy_task.py) registered through the config key `task_modules` and run end to end
through the real node (storescu in, SR out to a DCMTK storescp as the PACS), with no change
to service/.
"""

from __future__ import annotations

import math
import re
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import yaml
from onnx import TensorProto, helper

from phantoms.ct_head import write_ct_series
from pipelines.model_card import CardError, load_card, parse_card, sha256_of
from pipelines.sr_reading import read_result_sr
from pipelines.tasks import TaskError, known_tasks, register, task_named
from pipelines.tasks.ct_slices import CtSlices
from service.config import ConfigError, load_config
from tests.dicom_peers import StoreSCP, have_dcmtk, run_storescu
from tests.node_harness import PROJECT, TOKEN, RunningNode, poll
from tests.pacs_results import ANY_OBJECT_ARGS, results_for_study
from tests.validators import dciodvfy_errors

WEIGHT, BIAS, SCALE = 4.0, -1.0, 100.0  # the toy model: logit = WEIGHT * mean_hu / SCALE + BIAS
SLICES = 4


def toy_card(folder: Path, **changes) -> dict:
    """Write the toy model (one Mul, one Add) and its card into `folder`; return the card data."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["wx"]), helper.make_node("Add", ["wx", "b"], ["logit"])],
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["n", 1])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [1], [WEIGHT]),
                     helper.make_tensor("b", TensorProto.FLOAT, [1], [BIAS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    card = {
        "name": "toy_mean", "version": "0.0.1", "task": "toy-mean-hu",
        "intended_use": "Testing the task registry only.",
        "sha256": sha256_of(folder / "model.onnx"),
        "input": {"name": "x", "layout": "NC", "shape": [-1, 1]},
        "output": {"name": "logit", "activation": "sigmoid", "classes": ["dense"]},
        "selector": {"modality": ["CT"], "min_instances": SLICES},
        "preprocessing": {"scale": SCALE},
        "postprocessing": {"aggregation": "max", "threshold": 0.5, "key_images": 2,
                           "priority_when_positive": "normal"},
        "finding": {"code": {"value": "T-0001", "scheme": "99BEFUND", "meaning": "Toy density"}},
    }
    card.update(changes)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return card


@pytest.fixture(scope="module")
def toy_registered():
    import tests.toy_task  # noqa: F401 - registers toy-mean-hu, as task_modules would

    return task_named("toy-mean-hu")


# --- the registry ---------------------------------------------------------------------------


def test_unknown_task_is_a_card_error_naming_the_field_and_the_known_tasks(tmp_path):
    data = toy_card(tmp_path / "m", task="audio-clips")
    with pytest.raises(CardError) as err:
        parse_card(data, tmp_path / "m")
    message = str(err.value)
    assert f"{tmp_path / 'm'}/card.yaml.task" in message and "'audio-clips'" in message
    assert "ct-slices" in message and "wsi-tiles" in message and "task_modules" in message


def test_a_task_parses_its_own_blocks_and_names_the_field(tmp_path, toy_registered):
    with pytest.raises(CardError, match=r"card\.yaml\.preprocessing\.scale: -1\.0 must be greater"):
        parse_card(toy_card(tmp_path / "a", preprocessing={"scale": -1}), tmp_path / "a")
    with pytest.raises(CardError, match=r"card\.yaml\.preprocessing\.scale: required field"):
        parse_card(toy_card(tmp_path / "b", preprocessing={}), tmp_path / "b")
    with pytest.raises(CardError, match=r"card\.yaml\.input\.shape: \[-1, 3\] does not fit toy-mean-hu"):
        parse_card(toy_card(tmp_path / "c", input={"name": "x", "layout": "NC", "shape": [-1, 3]}),
                   tmp_path / "c")
    card = load_card(toy_card(tmp_path / "d") and tmp_path / "d")
    assert card.preprocessing.scale == SCALE and card.postprocessing.aggregation == "max"


def test_a_second_task_under_a_taken_name_is_refused():
    class Impostor(CtSlices):
        pass

    with pytest.raises(TaskError, match=r"ct-slices is already registered by pipelines\.tasks\.ct_slices"):
        register(Impostor())
    assert type(task_named("ct-slices")) is CtSlices


def test_an_object_without_the_task_methods_is_refused():
    class Half:
        name = "half-done"

        def analyse(self, card, paths, infer, executor=None):
            raise NotImplementedError

    with pytest.raises(TaskError, match=r"half-done: Half does not implement the Task protocol "
                                        r"\(missing .*build_sr.*parse_preprocessing"):
        register(Half())
    assert "half-done" not in known_tasks()


@pytest.mark.parametrize("modules,message", [
    (["tests.no_such_task"], r"cannot import tests\.no_such_task: ModuleNotFoundError"),
    (["tests/toy_task.py"], r"'tests/toy_task\.py' is not a dotted module name"),
    (["tests.pacs_results"], r"tests\.pacs_results registered no task"),
    ("not a list", r"'not a list' is not a dotted module name"),
    ([3], r"give a list of dotted module names"),
])
def test_task_modules_are_checked_when_the_config_loads(tmp_path, modules, message):
    path = tmp_path / "befund.yaml"
    path.write_text(yaml.safe_dump({"task_modules": modules}))
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_task_modules_come_from_the_environment_too(tmp_path):
    cfg = load_config(None, env={"BEFUND_TASK_MODULES": "tests.toy_task, pipelines.tasks.ct_slices"})
    assert cfg.task_modules == ("tests.toy_task", "pipelines.tasks.ct_slices")
    assert "toy-mean-hu" in known_tasks()


def test_service_never_branches_on_a_task_name():
    """The seam holds: no module of service/ compares a card's task or names a built-in one."""
    offenders = []
    for path in sorted((PROJECT / "service").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.task\s*(==|!=|\bin\b)|[\"'](ct-slices|wsi-tiles)[\"']", line):
                offenders.append(f"{path.relative_to(PROJECT)}:{n}: {line.strip()}")
    assert offenders == []


# --- end to end through the node --------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    if not have_dcmtk():
        pytest.skip("DCMTK is not installed")
    with StoreSCP(tmp_path_factory.mktemp("toy-pacs"), ae="PACS", extra_args=ANY_OBJECT_ARGS) as scp:
        yield scp


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    models = tmp_path_factory.mktemp("toy-models")
    toy_card(models / "toy_mean")
    with RunningNode(tmp_path_factory.mktemp("toy-node"), pacs=f"PACS@127.0.0.1:{pacs.port}",
                     models_dir=str(models), task_modules=["tests.toy_task"],
                     env={"PYTHONPATH": str(PROJECT)}) as n:
        yield n


def test_a_task_from_the_test_tree_runs_end_to_end_through_the_node(node, pacs, tmp_path):
    from tests.toy_task import mean_hu

    paths = write_ct_series(tmp_path / "toy", finding="subdural", slices=SLICES, seed=9301)
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    result = run_storescu(paths, ae="MODALITY", port=node.dicom_port, timeout=60)
    assert result.returncode == 0, result.output

    [sr] = poll(lambda: results_for_study(pacs.directory, study_uid, "SR") or None, 90, 0.2,
                f"the toy SR of study {study_uid} at the PACS")
    probabilities = [1 / (1 + math.exp(-(WEIGHT * mean_hu(p) / SCALE + BIAS))) for p in paths]
    score = max(probabilities)
    info = read_result_sr(sr)
    assert info["algorithm"]["name"] == "toy_mean"
    assert info["finding"]["meaning"] == "Toy density"
    assert info["present"] is (score >= 0.5)
    top = np.argsort(probabilities)[::-1][:2]
    sent = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert set(info["referenced_sop_instance_uids"]) == {sent[i] for i in top}
    assert dciodvfy_errors(sr.filename) == []

    study = node.wait_study_state(study_uid, {"delivered"})
    [job] = study["jobs"]
    assert job["model"] == "toy_mean" and job["score"] == pytest.approx(score, abs=1e-5)
    assert job["measurements"]["instances"] == SLICES
    assert job["priority"] == ("normal" if score >= 0.5 else "low")  # the toy's worklist summary
    labels = [v["label"] for v in study["key_image_views"]]
    assert labels == [f"toy instance {i + 1} of {SLICES}, score {probabilities[i]:.2f}" for i in top]
    request = urllib.request.Request(f"{node.url}/studies/{study_uid}/key-images/0.png",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.read().startswith(b"\x89PNG")  # drawn by the toy task
