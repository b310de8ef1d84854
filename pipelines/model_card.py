"""The model card: the ML engineer's contract, parsed into typed parts that check themselves.

A model is a folder with `card.yaml` and `model.onnx`. Adding a model that fits an existing
task (`ct-slices`, `wsi-tiles`) needs no code: the card says what the node must feed it, which
series it takes, and how its scores become a coded finding. The blocks that differ between
tasks (`preprocessing`, `postprocessing`) are parsed by the card's task (pipelines/tasks/);
this module parses what every card has.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# active: runs and delivers; shadow: runs on the same traffic, results kept but never delivered
# or shown to readers; disabled: loaded nowhere (pipelines/model_lineup.py decides what runs)
MODES = ("active", "shadow", "disabled")
ACTIVATIONS = ("sigmoid", "softmax", "none")


class CardError(ValueError):
    """A model card that cannot be used; the message names the card and the field."""


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme, meaning), e.g. (1386000, SCT, Intracranial hemorrhage)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    layout: str
    shape: tuple[int, ...]  # -1 for the dynamic batch axis
    dtype: str = "float32"


@dataclass(frozen=True)
class OutputSpec:
    name: str
    activation: str
    classes: tuple[str, ...]
    positive_class: str


@dataclass(frozen=True)
class Selector:
    """Which series a model takes. A series matches when every given criterion holds."""

    modality: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    description_regex: str = ""
    min_instances: int = 1
    image_types_excluded: tuple[str, ...] = ("LOCALIZER",)

    def matches(self, series: dict[str, Any]) -> bool:
        """`series` holds modality, sop_class_uid, body_part, descriptions, instance_count."""
        return not self.mismatch(series)

    def mismatch(self, series: dict[str, Any]) -> str:
        """Return why a series does not match, or '' when it does."""
        if self.modality and (series.get("modality") or "").upper() not in self.modality:
            return f"modality {series.get('modality')!r} not in {list(self.modality)}"
        if self.sop_classes and series.get("sop_class_uid") not in self.sop_classes:
            return f"SOP class {series.get('sop_class_uid')} not taken"
        body = (series.get("body_part") or "").strip().upper()
        text = " ".join(series.get("descriptions") or ())
        body_ok = bool(self.body_parts) and body in self.body_parts
        text_ok = bool(self.description_regex) and re.search(self.description_regex, text)
        if (self.body_parts or self.description_regex) and not (body_ok or text_ok):
            return f"body part {body or 'absent'!s} and descriptions do not match"
        image_type = {t.upper() for t in series.get("image_type") or ()}
        if image_type & set(self.image_types_excluded):
            return f"image type {sorted(image_type)} excluded"
        return ""


@dataclass(frozen=True)
class CtPreprocessing:
    windows: tuple[tuple[float, float], ...]  # (centre, width) in HU
    context_slices: int  # slices either side (2.5D)
    size: int  # output height and width in pixels
    min_slices: int
    max_slice_gap_mm: float = 10.0


@dataclass(frozen=True)
class WsiPreprocessing:
    spacing_um: float  # pixel spacing the model was trained at (um/px)
    tile_size: int
    overlap: int = 0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tissue_saturation: float = 7.0  # 0-255 HSV saturation threshold
    tissue_min_fraction: float = 0.0005
    batch_size: int = 64


@dataclass(frozen=True)
class Postprocessing:
    aggregation: str
    threshold: float
    priority_when_positive: str = "high"
    key_images: int = 3


@dataclass(frozen=True)
class Finding:
    code: Code
    site: Code | None = None


@dataclass(frozen=True)
class Range:
    """A closed range of a header value the model was validated on, e.g. slice thickness 2.5-5 mm."""

    lo: float
    hi: float

    def holds(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def __str__(self) -> str:
        return f"{self.lo:g}-{self.hi:g}"


@dataclass(frozen=True)
class OodScore:
    """A data-driven out-of-distribution score: the Mahalanobis distance of an input's feature
    vector (`features` names the function in pipelines.domain) from the training set's mean,
    refused above `threshold` (chosen so that at most 1 % of held-out in-domain inputs are)."""

    features: str
    names: tuple[str, ...]
    mean: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]  # inverse covariance, len(names) x len(names)
    threshold: float
    fit: dict[str, Any] = field(default_factory=dict)  # what it was fit on and measured rejections


@dataclass(frozen=True)
class ValidatedDomain:
    """What the model was validated on; an input outside it is "not analysed", never a verdict.

    Explicit checks read headers (a value the header does not give is not checked); `ood`
    scores the pixels. `never_validated_on` is for people: the card's honest list of gaps.
    """

    slice_thickness_mm: Range | None = None
    slice_spacing_mm: Range | None = None
    pixel_spacing_mm: Range | None = None
    pixel_spacing_um: Range | None = None
    kvp: Range | None = None
    convolution_kernel_families: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    contrast: bool | None = None  # False: validated without contrast; a named agent is outside
    stains: tuple[str, ...] = ()
    ood: OodScore | None = None
    never_validated_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling of the study (slide) score around the card's threshold.

    p = sigmoid((logit(score) - logit(threshold)) / temperature): the verdict is unchanged (p >=
    0.5 exactly when score >= threshold), only its certainty is made honest. `max_certainty`
    caps it at what the calibration set can support (1 - 1/(n+2) for n cases; models/domain_fit.py).
    """

    method: str
    temperature: float
    max_certainty: float
    fit: dict[str, Any] = field(default_factory=dict)  # seeds, ECE before/after, diagram

    def probability(self, score: float, threshold: float) -> float:
        """Calibrated probability that the finding is present."""
        eps = 1e-12
        s = min(max(float(score), eps), 1.0 - eps)
        t = min(max(float(threshold), eps), 1.0 - eps)
        z = (np.log(s / (1.0 - s)) - np.log(t / (1.0 - t))) / self.temperature
        p = float(1.0 / (1.0 + np.exp(-z)))
        return min(max(p, 1.0 - self.max_certainty), self.max_certainty)


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str
    description: str
    intended_use: str
    folder: Path
    file: str
    sha256: str
    input: TensorSpec
    output: OutputSpec
    selector: Selector
    preprocessing: Any  # the task's own parsed block (CtPreprocessing, WsiPreprocessing, ...)
    postprocessing: Postprocessing  # or a task's subclass of it
    finding: Finding
    manufacturer: str = "befund"
    opset: int | None = None  # the ai.onnx opset the file was exported with (`befund model check`)
    validation: dict[str, Any] = field(default_factory=dict)
    validated_domain: ValidatedDomain | None = None
    calibration: Calibration | None = None
    mode: str = "active"  # one of MODES
    supersedes: str = ""  # the version of the same model this one replaces while both are active

    @property
    def model_path(self) -> Path:
        return self.folder / self.file

    @property
    def key(self) -> str:
        """name@version: one job per series x this key."""
        return f"{self.name}@{self.version}"

    def verify_file(self) -> None:
        """Refuse an ONNX file whose sha256 differs from the card's (a stale or swapped model)."""
        if not self.model_path.is_file():
            raise CardError(f"{self.folder}/card.yaml: file {self.file} does not exist")
        digest = sha256_of(self.model_path)
        if digest != self.sha256:
            raise CardError(
                f"{self.folder}/card.yaml: sha256 of {self.file} is {digest}, card says {self.sha256}"
            )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CardFields:
    """Reads a mapping and names the card and field path in every error (tasks parse their
    blocks with it, so their errors read like the card's own)."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise CardError(f"{where}: expected a mapping")
        self.data = data
        self.where = where

    def req(self, key: str, kind: type = str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise CardError(f"{self.where}.{key}: required field is missing")
        return self._as(key, self.data[key], kind)

    def opt(self, key: str, default: Any, kind: type = str) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        return self._as(key, self.data[key], kind)

    def sub(self, key: str) -> CardFields:
        return CardFields(self.req(key, dict), f"{self.where}.{key}")

    def _as(self, key: str, value: Any, kind: type) -> Any:
        try:
            if kind is dict and not isinstance(value, dict):
                raise TypeError
            if kind is list and not isinstance(value, list):
                raise TypeError
            return kind(value)
        except (TypeError, ValueError) as exc:
            raise CardError(f"{self.where}.{key}: {value!r} is not a {kind.__name__}") from exc


def _code(f: CardFields) -> Code:
    return Code(value=str(f.req("value")), scheme=f.req("scheme"), meaning=f.req("meaning"))


def _strings(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        return (values,)
    return tuple(str(v) for v in values or ())


def _range(f: CardFields, key: str) -> Range | None:
    value = f.opt(key, None, list)
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise CardError(f"{f.where}.{key}: give [min, max] as two numbers, not {value!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise CardError(f"{f.where}.{key}: [{lo:g}, {hi:g}] is not a range (min <= max)")
    return Range(lo, hi)


def _ood(f: CardFields) -> OodScore:
    from pipelines.domain import FEATURES  # the feature functions a card may name

    features = f.req("features")
    if features not in FEATURES:
        raise CardError(f"{f.where}.features: {features!r} is not one of {', '.join(sorted(FEATURES))}")
    names = _strings(f.req("names", list))
    if names != FEATURES[features].names:
        raise CardError(f"{f.where}.names: {list(names)} are not the features {features} computes "
                        f"({list(FEATURES[features].names)})")
    try:
        mean = tuple(float(v) for v in f.req("mean", list))
        precision = tuple(tuple(float(v) for v in row) for row in f.req("precision", list))
    except (TypeError, ValueError) as exc:
        raise CardError(f"{f.where}: mean and precision must hold numbers") from exc
    d = len(names)
    if len(mean) != d:
        raise CardError(f"{f.where}.mean: {len(mean)} values for {d} features")
    matrix = np.array(precision, dtype=np.float64) if precision else np.zeros((0, 0))
    if matrix.shape != (d, d) or not np.all(np.isfinite(matrix)) \
            or not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9):
        raise CardError(f"{f.where}.precision: must be a symmetric {d} x {d} matrix of numbers")
    if np.linalg.eigvalsh(matrix).min() <= 0:
        raise CardError(f"{f.where}.precision: must be positive definite (an inverse covariance)")
    threshold = f.req("threshold", float)
    if not threshold > 0:
        raise CardError(f"{f.where}.threshold: {threshold} must be positive")
    return OodScore(features, names, mean, precision, threshold, dict(f.opt("fit", {}, dict)))


def _validated_domain(f: CardFields) -> ValidatedDomain:
    known = {"slice_thickness_mm", "slice_spacing_mm", "pixel_spacing_mm", "pixel_spacing_um", "kvp",
             "convolution_kernel_families", "body_parts", "contrast", "stains", "ood",
             "never_validated_on"}
    unknown = sorted(set(f.data) - known)
    if unknown:
        raise CardError(f"{f.where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    contrast = f.data.get("contrast")
    if contrast is not None and not isinstance(contrast, bool):
        raise CardError(f"{f.where}.contrast: {contrast!r} is not true or false")
    families = tuple(k.lower() for k in _strings(f.opt("convolution_kernel_families", [], list)))
    from pipelines.domain import KERNEL_FAMILIES

    for family in families:
        if family not in KERNEL_FAMILIES:
            raise CardError(f"{f.where}.convolution_kernel_families: {family!r} is not one of "
                            f"{', '.join(KERNEL_FAMILIES)}")
    items = f.opt("never_validated_on", [], list)
    if any(not isinstance(item, str) for item in items):
        raise CardError(f"{f.where}.never_validated_on: give one line of text per item (quote a "
                        "line that holds ': ')")
    never = tuple(items)
    if not never:
        raise CardError(f"{f.where}.never_validated_on: required field is missing (list what the "
                        "model was never validated on)")
    return ValidatedDomain(
        slice_thickness_mm=_range(f, "slice_thickness_mm"),
        slice_spacing_mm=_range(f, "slice_spacing_mm"),
        pixel_spacing_mm=_range(f, "pixel_spacing_mm"),
        pixel_spacing_um=_range(f, "pixel_spacing_um"),
        kvp=_range(f, "kvp"),
        convolution_kernel_families=families,
        body_parts=tuple(b.upper() for b in _strings(f.opt("body_parts", [], list))),
        contrast=contrast,
        stains=tuple(st.lower() for st in _strings(f.opt("stains", [], list))),
        ood=_ood(f.sub("ood")) if f.data.get("ood") is not None else None,
        never_validated_on=never,
    )


CALIBRATION_METHODS = ("temperature",)


def _calibration(f: CardFields) -> Calibration:
    method = f.req("method")
    if method not in CALIBRATION_METHODS:
        raise CardError(f"{f.where}.method: {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    temperature = f.req("temperature", float)
    if not (np.isfinite(temperature) and temperature > 0):
        raise CardError(f"{f.where}.temperature: {temperature} must be a positive number")
    cap = f.req("max_certainty", float)
    if not 0.5 < cap < 1.0:
        raise CardError(f"{f.where}.max_certainty: {cap} must lie between 0.5 and 1 (exclusive)")
    return Calibration(method, temperature, cap, dict(f.opt("fit", {}, dict)))


def parse_postprocessing(q: CardFields) -> Postprocessing:
    """The postprocessing block of a task whose verdict is a score against a threshold."""
    from pipelines.scoring import AGGREGATIONS

    aggregation = q.req("aggregation")
    if aggregation not in AGGREGATIONS:
        raise CardError(f"{q.where}.aggregation: {aggregation!r} is not one of {AGGREGATIONS}")
    threshold = q.req("threshold", float)
    if not 0.0 < threshold < 1.0:
        raise CardError(f"{q.where}.threshold: {threshold} must lie between 0 and 1")
    return Postprocessing(
        aggregation=aggregation,
        threshold=threshold,
        priority_when_positive=q.opt("priority_when_positive", "high"),
        key_images=q.opt("key_images", 3, int),
    )


def parse_card(data: dict[str, Any], folder: Path) -> ModelCard:
    """Build a ModelCard from parsed YAML; every error names `folder/card.yaml` and the field."""
    from pipelines.tasks import task_named  # imported here: the tasks import this module

    f = CardFields(data, f"{folder}/card.yaml")
    task = f.req("task")
    kind = task_named(task, f"{f.where}.task")

    i = f.sub("input")
    shape = tuple(int(s) for s in i.req("shape", list))
    if not shape or shape[0] != -1:
        raise CardError(f"{i.where}.shape: the first (batch) axis must be -1 (dynamic), got {shape}")
    tensor = TensorSpec(i.req("name"), i.req("layout"), shape, i.opt("dtype", "float32"))

    o = f.sub("output")
    classes = _strings(o.req("classes", list))
    activation = o.req("activation")
    if activation not in ACTIVATIONS:
        raise CardError(f"{o.where}.activation: {activation!r} is not one of {ACTIVATIONS}")
    positive = o.opt("positive_class", classes[-1])
    if positive not in classes:
        raise CardError(f"{o.where}.positive_class: {positive!r} is not among classes {classes}")
    output = OutputSpec(o.req("name"), activation, classes, positive)

    s = f.sub("selector")
    regex = s.opt("description_regex", "")
    try:
        re.compile(regex)
    except re.error as exc:
        raise CardError(f"{s.where}.description_regex: {exc}") from exc
    selector = Selector(
        modality=tuple(m.upper() for m in _strings(s.opt("modality", [], list))),
        sop_classes=_strings(s.opt("sop_classes", [], list)),
        body_parts=tuple(b.upper() for b in _strings(s.opt("body_parts", [], list))),
        description_regex=regex,
        min_instances=s.opt("min_instances", 1, int),
        image_types_excluded=tuple(
            t.upper() for t in _strings(s.opt("image_types_excluded", ["LOCALIZER"], list))),
    )

    pre = kind.parse_preprocessing(f.sub("preprocessing"), tensor, i.where)
    post = kind.parse_postprocessing(f.sub("postprocessing"))

    fd = f.sub("finding")
    site = fd.data.get("site")
    finding = Finding(code=_code(fd.sub("code")), site=_code(fd.sub("site")) if site else None)

    mode = f.opt("mode", "active")
    if mode not in MODES:
        raise CardError(f"{f.where}.mode: {mode!r} is not one of {', '.join(MODES)}")
    version = str(f.req("version"))
    supersedes = str(f.opt("supersedes", ""))
    if supersedes == version:
        raise CardError(f"{f.where}.supersedes: {supersedes!r} is this card's own version; name the "
                        "older version this one replaces")

    sha = f.req("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CardError(f"{f.where}.sha256: must be 64 lower-case hex digits")
    return ModelCard(
        name=f.req("name"),
        version=version,
        task=task,
        description=f.opt("description", ""),
        intended_use=f.req("intended_use"),
        folder=folder,
        file=f.opt("file", "model.onnx"),
        sha256=sha,
        input=tensor,
        output=output,
        selector=selector,
        preprocessing=pre,
        postprocessing=post,
        finding=finding,
        manufacturer=f.opt("manufacturer", "befund"),
        opset=f.opt("opset", None, int),
        validation=dict(f.opt("validation", {}, dict)),
        validated_domain=(_validated_domain(f.sub("validated_domain"))
                          if f.data.get("validated_domain") is not None else None),
        calibration=_calibration(f.sub("calibration")) if f.data.get("calibration") is not None else None,
        mode=mode,
        supersedes=supersedes,
    )


def load_card(folder: str | Path, verify: bool = True) -> ModelCard:
    """Load and check `folder/card.yaml`; with `verify`, also check the ONNX file's sha256."""
    folder = Path(folder)
    path = folder / "card.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise CardError(f"{path}: no card.yaml in the model folder") from exc
    except yaml.YAMLError as exc:
        raise CardError(f"{path}: not valid YAML: {exc}") from exc
    card = parse_card(data, folder)
    from pipelines.card_fields import unknown_fields  # imported here: it imports this module

    unknown = unknown_fields(data, card)
    if unknown:  # a misspelt `mode:` or `treshold:` must not leave a model on its defaults
        raise CardError(f"{path}: unknown key(s): {'; '.join(unknown)}")
    if verify:
        card.verify_file()
    return card


def load_cards(models_dir: str | Path, verify: bool = True) -> list[ModelCard]:
    """Every model folder under `models_dir` (folders without card.yaml are skipped)."""
    root = Path(models_dir)
    cards = [load_card(p, verify) for p in sorted(root.iterdir()) if (p / "card.yaml").is_file()]
    keys = [c.key for c in cards]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise CardError(f"{root}: more than one card claims {', '.join(sorted(dupes))}")
    return cards


def usable_cards(models_dir: str | Path) -> tuple[list[ModelCard], dict[str, str]]:
    """The cards that run (active and shadow), and for each folder refused, why.

    One broken model folder (a card with a typo, an ONNX file still being trained) must not
    stop the node from serving the models that are fine; the node logs and shows the errors.
    Disabled and superseded cards are neither: pipelines/model_lineup.py lists them apart, and
    raises LineupError for two active versions of one model.
    """
    from pipelines.model_lineup import model_lineup

    lineup = model_lineup(models_dir)
    return list(lineup.cards), dict(lineup.errors)
