"""`befund model check DIR`: does the card describe the ONNX file, and does the file run?

Each check is one line, `ok` or `FAIL` with what to change. The node itself refuses a card
whose sha256 or shapes are wrong at start-up; this says so before a node is involved, and
also catches what the node would let pass (an unknown key such as a misspelt `treshold`, an
opset the card does not name, a model that loads but fails or returns NaN on its input).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipelines.card_fields import unknown_fields
from pipelines.model_card import CardError, ModelCard, parse_card, sha256_of

# onnxruntime's element types for the card's `dtype` names
ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)",
              "uint8": "tensor(uint8)", "int8": "tensor(int8)", "int64": "tensor(int64)"}
NOT_COMPUTE = {"AzureExecutionProvider"}  # listed by onnxruntime, runs no local inference
SMOKE_BATCHES = (1, 2)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class CheckReport:
    folder: Path
    checks: list[Check] = field(default_factory=list)
    card: ModelCard | None = None
    smoke: dict[str, Any] = field(default_factory=dict)  # provider -> timings and outputs

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok


def fix_sha256(folder: Path) -> str:
    """Rewrite the card's `sha256:` line to the model file's digest; return the digest.
    The rest of the file (comments, order) stays as written."""
    card_path = folder / "card.yaml"
    try:
        data = yaml.safe_load(card_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{card_path}: cannot fix sha256: {_one_line(exc)}") from exc
    model = folder / str(data.get("file") or "model.onnx")
    if not model.is_file():
        raise ValueError(f"{card_path}: cannot fix sha256, {model.name} does not exist")
    digest = sha256_of(model)
    text = card_path.read_text()
    new, n = re.subn(r'(?m)^sha256:.*$', f'sha256: "{digest}"', text)
    if n == 0:
        new = text.rstrip("\n") + f'\nsha256: "{digest}"\n'
    card_path.write_text(new)
    return digest


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def check_model(folder: Path, providers: list[str] | None = None) -> CheckReport:
    """Every check on the model folder; stops early only when the card cannot be read at all."""
    import onnxruntime as ort

    report = CheckReport(Path(folder))
    card_path = report.folder / "card.yaml"
    try:
        data = yaml.safe_load(card_path.read_text())
    except FileNotFoundError:
        report.add("card", False, f"no card.yaml in {report.folder}")
        return report
    except yaml.YAMLError as exc:
        report.add("card", False, f"{card_path} is not valid YAML: {_one_line(exc)}")
        return report
    try:
        card = parse_card(data, report.folder)
    except CardError as exc:
        report.add("card", False, str(exc))
        return report
    report.card = card
    report.add("card", True, f"{card.key}, task {card.task}")
    unknown = unknown_fields(data, card)
    for path in unknown:
        report.add("card fields", False, f"unknown key {path}")
    if not unknown:
        report.add("card fields", True, "every key is known")

    if not card.model_path.is_file():
        report.add("sha256", False, f"{card.file} does not exist in {report.folder}")
        return report
    digest = sha256_of(card.model_path)
    report.add("sha256", digest == card.sha256,
               "matches the card" if digest == card.sha256 else
               f"{card.file} has {digest}, the card says {card.sha256} (befund model check --fix-sha256 "
               "rewrites it, once you know the file is the one you meant)")

    try:
        session = ort.InferenceSession(str(card.model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        report.add("onnx", False, f"onnxruntime cannot load {card.file}: {exc}")
        return report
    before = len(report.checks)
    _check_input(report, card, session)
    _check_output(report, card, session)
    _check_opset(report, card)
    if not all(c.ok for c in report.checks[before:]):
        report.add("smoke", False, "not run: the card does not describe the ONNX file (see above)")
        return report
    wanted = providers or [p for p in ort.get_available_providers() if p not in NOT_COMPUTE]
    for provider in wanted:
        _smoke(report, card, provider)
    return report


def _check_input(report: CheckReport, card: ModelCard, session: Any) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    got = inputs.get(card.input.name)
    if got is None:
        report.add("input name", False, f"card input.name is {card.input.name!r}, the ONNX inputs are "
                   f"{sorted(inputs)}")
        return
    report.add("input name", True, card.input.name)
    extra = sorted(set(inputs) - {card.input.name})
    if extra:
        report.add("input count", False, f"the ONNX file also needs inputs {extra}; befund feeds one")
    _check_shape(report, "input", card.input.shape, got.shape)
    want_type = ONNX_TYPES.get(card.input.dtype, card.input.dtype)
    report.add("input dtype", got.type == want_type,
               f"{card.input.dtype}" if got.type == want_type else
               f"card input.dtype is {card.input.dtype} ({want_type}), the ONNX input is {got.type}")


def output_shape(card: ModelCard) -> tuple[int, ...]:
    """The output shape the card's task expects (-1 for the batch): (-1, classes) for a
    classifier; a task may say otherwise (a segmentation: one logit per input pixel)."""
    from pipelines.tasks import task_of

    shape = getattr(task_of(card), "output_shape", None)
    return tuple(shape(card)) if shape else (-1, len(card.output.classes))


def _check_output(report: CheckReport, card: ModelCard, session: Any) -> None:
    outputs = {o.name: o for o in session.get_outputs()}
    got = outputs.get(card.output.name)
    if got is None:
        report.add("output name", False, f"card output.name is {card.output.name!r}, the ONNX outputs "
                   f"are {sorted(outputs)}")
        return
    report.add("output name", True, card.output.name)
    want = output_shape(card)
    _check_shape(report, "output", want, got.shape,
                 f" ({len(card.output.classes)} classes in output.classes)" if len(want) == 2 else
                 f" (what a {card.task} model returns)")
    report.add("output dtype", got.type == "tensor(float)",
               "float32" if got.type == "tensor(float)" else f"the ONNX output is {got.type}, befund "
               "reads float32 scores")


def _check_shape(report: CheckReport, what: str, want: tuple[int, ...], got: list[Any],
                 why: str = "") -> None:
    name = f"{what} shape"
    if len(got) != len(want):
        report.add(name, False, f"card has {len(want)} axes {list(want)}{why}, the ONNX {what} has "
                   f"{len(got)} {got}")
        return
    if isinstance(got[0], int) and got[0] > 0:
        report.add(name, False, f"the ONNX {what}'s batch axis is fixed at {got[0]}; export it dynamic "
                   "(e.g. torch.onnx.export(dynamic_axes={...: {0: 'batch'}}))")
        return
    wrong = [(i, w, g) for i, (w, g) in enumerate(zip(want[1:], got[1:], strict=True), start=1)
             if isinstance(g, int) and g > 0 and g != w]
    if wrong:
        report.add(name, False, "; ".join(f"axis {i}: card {w}, ONNX {g}" for i, w, g in wrong) + why)
        return
    report.add(name, True, f"{list(want)} (ONNX {got})")


def _check_opset(report: CheckReport, card: ModelCard) -> None:
    from service.model_tools.onnx_graph import opsets

    try:
        found = opsets(card.model_path)
    except ImportError as exc:
        report.add("opset", card.opset is None, f"not read: {exc}")
        return
    opset = found.get("ai.onnx")
    if card.opset is None:
        report.add("opset", True, f"the file uses opset {opset}; the card names none (add `opset: {opset}`)")
    else:
        report.add("opset", card.opset == opset,
                   f"{opset}" if card.opset == opset else
                   f"card opset is {card.opset}, the file's is {opset}")


def _smoke(report: CheckReport, card: ModelCard, provider: str) -> None:
    """Load under `provider` alone-first and run synthetic batches of the card's shape."""
    import onnxruntime as ort

    name = f"smoke {provider.removesuffix('ExecutionProvider')}"
    try:
        t = time.perf_counter()
        session = ort.InferenceSession(str(card.model_path),
                                       providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        load_s = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        report.add(name, False, f"cannot create a session: {exc}")
        return
    if session.get_providers()[0] != provider:
        report.add(name, False, f"onnxruntime fell back to {session.get_providers()[0]}")
        return
    rng = np.random.default_rng(0)
    dtype = np.dtype(card.input.dtype) if card.input.dtype in ONNX_TYPES else np.float32
    timings, outputs = {}, {}
    for batch in SMOKE_BATCHES:
        x = rng.standard_normal((batch, *card.input.shape[1:])).astype(dtype)
        try:
            t = time.perf_counter()
            y = session.run([card.output.name], {card.input.name: x})[0]
            timings[batch] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
            report.add(name, False, f"inference on a ({batch}, {', '.join(map(str, card.input.shape[1:]))})"
                       f" batch failed: {exc}")
            return
        want = (batch, *output_shape(card)[1:])
        if tuple(y.shape) != want:
            report.add(name, False, f"a batch of {batch} gave output shape {tuple(y.shape)}, expected {want}")
            return
        if not np.all(np.isfinite(y)):
            report.add(name, False, f"a batch of {batch} gave non-finite outputs (NaN or inf)")
            return
        outputs[batch] = y
    report.smoke[provider] = {"load_s": round(load_s, 4),
                              "seconds_by_batch": {b: round(s, 5) for b, s in timings.items()},
                              "output_sample": outputs[SMOKE_BATCHES[-1]][:2].tolist()}
    report.add(name, True, f"batches {', '.join(map(str, SMOKE_BATCHES))} ran, finite outputs; "
               f"load {load_s:.2f} s")
    first = next(iter(report.smoke))
    if first != provider:  # the same synthetic input under each provider should agree
        sample = np.array(report.smoke[first]["output_sample"])
        diff = float(np.abs(sample - outputs[SMOKE_BATCHES[-1]][:2]).max())
        report.smoke[provider]["max_abs_diff_to_" + first] = diff
