"""What an analysis produced, in a form that crosses the model-service boundary as plain JSON.

A result is either analysed (verdict, certainty, key images) or not analysed with a reason a
radiographer can act on. Silence never stands for "negative": every job ends in one of these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class NotAnalysable(Exception):
    """The input cannot be analysed; the message is shown to radiologists as the reason."""


@dataclass(frozen=True)
class KeyImage:
    """An image (or one frame of it) that supports the verdict."""

    sop_class_uid: str
    sop_instance_uid: str
    score: float
    frame: int | None = None


@dataclass(frozen=True)
class AnalysisResult:
    analysed: bool
    present: bool | None = None
    score: float | None = None  # aggregated probability that the finding is present
    certainty: float | None = None  # probability of the stated verdict, 0..1
    threshold: float | None = None
    reason: str = ""  # why not analysed
    key_images: tuple[KeyImage, ...] = ()
    scores: tuple[float, ...] = ()  # per slice (sorted order) or per tissue tile
    measurements: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    heatmap: dict[str, Any] | None = None  # WSI: {"rows","cols","values" (row-major), ...}
    # CT segmentation: {"rows", "columns", "slices": [{"sop_instance_uid", "runs"}]}, the
    # non-empty slices' masks run-length coded (pipelines.ct_volume.mask_to_runs)
    segmentation: dict[str, Any] | None = None
    threshold_source: str = ""  # where `threshold` came from when not the card: a site's operating point

    def __post_init__(self) -> None:
        if not self.analysed and not self.reason:
            raise ValueError("a result that was not analysed needs a reason")
        if self.analysed and self.present is None:
            raise ValueError("an analysed result needs a verdict")
        if self.certainty is not None and not 0.0 <= self.certainty <= 1.0:
            raise ValueError(f"certainty {self.certainty} is outside 0..1")

    @classmethod
    def not_analysed(cls, reason: str, **timings: float) -> AnalysisResult:
        return cls(analysed=False, reason=reason, timings=dict(timings))

    @classmethod
    def verdict(cls, score: float, threshold: float, probability: float | None = None,
                **kw: Any) -> AnalysisResult:
        """Verdict from a score: certainty is the probability of the stated verdict.

        `probability` is the calibrated probability that the finding is present (the card's
        calibration of `score`); without one, the raw score stands in for it.
        """
        present = score >= threshold
        p = score if probability is None else probability
        certainty = p if present else 1.0 - p
        return cls(analysed=True, present=present, score=float(score),
                   certainty=float(min(max(certainty, 0.0), 1.0)), threshold=threshold, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        data = dict(data)
        data["key_images"] = tuple(KeyImage(**k) for k in data.get("key_images") or ())
        data["scores"] = tuple(data.get("scores") or ())
        return cls(**data)
