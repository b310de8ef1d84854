"""A result judged at another threshold than the card's: a site's operating point.

The model's score, and the card's calibrated probability of that score, say how likely the
finding is; they do not depend on where a site draws the line. Only the verdict does: present
when score >= threshold. The certainty stays the probability of the stated verdict (so a site
that flags at a lower threshold flags some cases with a certainty below 50 %, which is what
such an operating point means). Measurements counted against the threshold (CT: slices above
it) are counted again at the new one.
"""

from __future__ import annotations

from dataclasses import replace

from pipelines.findings import AnalysisResult
from pipelines.model_card import ModelCard

COUNTED_AGAINST_THRESHOLD = "slices_above_threshold"


def at_threshold(result: AnalysisResult, card: ModelCard, threshold: float,
                 source: str) -> AnalysisResult:
    """`result` with its verdict at `threshold`; `source` says where the threshold came from."""
    if not result.analysed or result.score is None:
        return result
    score = float(result.score)
    probability = score
    if card.calibration is not None:
        probability = card.calibration.probability(score, card.postprocessing.threshold)
    present = score >= threshold
    certainty = probability if present else 1.0 - probability
    measurements = dict(result.measurements)
    if COUNTED_AGAINST_THRESHOLD in measurements and result.scores:
        measurements[COUNTED_AGAINST_THRESHOLD] = float(sum(s >= threshold for s in result.scores))
    return replace(result, present=present, threshold=float(threshold),
                   certainty=float(min(max(certainty, 0.0), 1.0)), measurements=measurements,
                   threshold_source=source)
