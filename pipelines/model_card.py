"""The model card: the ML engineer's contract, parsed into typed parts that check themselves.

A model is a folder with `card.yaml` and `model.onnx`. Adding a model that fits an existing
task (`ct-slices`, `wsi-tiles`) needs no code: the card says what the node must feed it, which
series it takes, and how its scores become a coded finding.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("ct-slices", "wsi-tiles")
ACTIVATIONS = ("sigmoid", "softmax", "none")
AGGREGATIONS = ("max", "top3_mean", "noisy_or")


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
    preprocessing: CtPreprocessing | WsiPreprocessing
    postprocessing: Postprocessing
    finding: Finding
    manufacturer: str = "befund"
    validation: dict[str, Any] = field(default_factory=dict)

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


class _Fields:
    """Reads a mapping and names the card and field path in every error."""

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

    def sub(self, key: str) -> _Fields:
        return _Fields(self.req(key, dict), f"{self.where}.{key}")

    def _as(self, key: str, value: Any, kind: type) -> Any:
        try:
            if kind is dict and not isinstance(value, dict):
                raise TypeError
            if kind is list and not isinstance(value, list):
                raise TypeError
            return kind(value)
        except (TypeError, ValueError) as exc:
            raise CardError(f"{self.where}.{key}: {value!r} is not a {kind.__name__}") from exc


def _code(f: _Fields) -> Code:
    return Code(value=str(f.req("value")), scheme=f.req("scheme"), meaning=f.req("meaning"))


def _strings(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        return (values,)
    return tuple(str(v) for v in values or ())


def parse_card(data: dict[str, Any], folder: Path) -> ModelCard:
    """Build a ModelCard from parsed YAML; every error names `folder/card.yaml` and the field."""
    f = _Fields(data, f"{folder}/card.yaml")
    task = f.req("task")
    if task not in TASKS:
        raise CardError(f"{f.where}.task: {task!r} is not one of {', '.join(TASKS)}")

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

    p = f.sub("preprocessing")
    if task == "ct-slices":
        windows = tuple((float(c), float(w)) for c, w in p.req("windows", list))
        if not windows or any(w <= 0 for _, w in windows):
            raise CardError(f"{p.where}.windows: give [centre, width] pairs with width > 0")
        pre: CtPreprocessing | WsiPreprocessing = CtPreprocessing(
            windows=windows,
            context_slices=p.req("context_slices", int),
            size=p.req("size", int),
            min_slices=p.opt("min_slices", 16, int),
            max_slice_gap_mm=p.opt("max_slice_gap_mm", 10.0, float),
        )
        expected_channels = len(windows) * (2 * pre.context_slices + 1)
        if tensor.shape[1:] != (expected_channels, pre.size, pre.size):
            raise CardError(
                f"{i.where}.shape: {list(shape)} does not fit preprocessing "
                f"({len(windows)} windows x {2 * pre.context_slices + 1} slices, size {pre.size}): "
                f"expected [-1, {expected_channels}, {pre.size}, {pre.size}]"
            )
    else:
        pre = WsiPreprocessing(
            spacing_um=p.req("spacing_um", float),
            tile_size=p.req("tile_size", int),
            overlap=p.opt("overlap", 0, int),
            mean=tuple(float(v) for v in p.opt("mean", [0, 0, 0], list)),
            std=tuple(float(v) for v in p.opt("std", [1, 1, 1], list)),
            tissue_saturation=p.opt("tissue_saturation", 7.0, float),
            tissue_min_fraction=p.opt("tissue_min_fraction", 0.0005, float),
            batch_size=p.opt("batch_size", 64, int),
        )
        if pre.spacing_um <= 0 or pre.tile_size <= 0:
            raise CardError(f"{p.where}: spacing_um and tile_size must be positive")

    q = f.sub("postprocessing")
    aggregation = q.req("aggregation")
    if aggregation not in AGGREGATIONS:
        raise CardError(f"{q.where}.aggregation: {aggregation!r} is not one of {AGGREGATIONS}")
    threshold = q.req("threshold", float)
    if not 0.0 < threshold < 1.0:
        raise CardError(f"{q.where}.threshold: {threshold} must lie between 0 and 1")
    post = Postprocessing(
        aggregation=aggregation,
        threshold=threshold,
        priority_when_positive=q.opt("priority_when_positive", "high"),
        key_images=q.opt("key_images", 3, int),
    )

    fd = f.sub("finding")
    site = fd.data.get("site")
    finding = Finding(code=_code(fd.sub("code")), site=_code(fd.sub("site")) if site else None)

    sha = f.req("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CardError(f"{f.where}.sha256: must be 64 lower-case hex digits")
    return ModelCard(
        name=f.req("name"),
        version=str(f.req("version")),
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
        validation=dict(f.opt("validation", {}, dict)),
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
    """The cards that load, and for each folder that does not, why.

    One broken model folder (a card with a typo, an ONNX file still being trained) must not
    stop the node from serving the models that are fine; the node logs and shows the errors.
    """
    root = Path(models_dir)
    cards: list[ModelCard] = []
    errors: dict[str, str] = {}
    if not root.is_dir():
        return cards, {str(root): "models folder does not exist"}
    for folder in sorted(p for p in root.iterdir() if (p / "card.yaml").is_file()):
        try:
            card = load_card(folder)
        except CardError as exc:
            errors[folder.name] = str(exc)
            continue
        if any(c.key == card.key for c in cards):
            errors[folder.name] = f"{card.key} is already served by another folder"
            continue
        cards.append(card)
    return cards, errors
