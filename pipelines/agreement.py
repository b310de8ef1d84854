"""How far two models' verdicts on the same cases agree: the 2 x 2 table, observed agreement,
Cohen's kappa and each model's flag rate. Pure arithmetic, for the shadow report
(service/shadow_report.py) and any version-against-version comparison.

Cohen's kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e the agreement
expected by chance from each model's flag rate (Cohen 1960). When chance alone explains all
agreement (p_e = 1: both models gave one and the same verdict to every case), kappa is
undefined and given as None, with the observed agreement still reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """Counts of paired verdicts (first model, second model) on the same cases."""

    both_positive: int = 0
    first_only: int = 0  # the first model flags, the second does not
    second_only: int = 0
    both_negative: int = 0

    @classmethod
    def of(cls, pairs: Iterable[tuple[bool, bool]]) -> Agreement:
        counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
        for first, second in pairs:
            counts[(bool(first), bool(second))] += 1
        return cls(counts[True, True], counts[True, False], counts[False, True], counts[False, False])

    @property
    def n(self) -> int:
        return self.both_positive + self.first_only + self.second_only + self.both_negative

    @property
    def observed(self) -> float | None:
        """The share of cases with the same verdict."""
        return (self.both_positive + self.both_negative) / self.n if self.n else None

    @property
    def first_flag_rate(self) -> float | None:
        return (self.both_positive + self.first_only) / self.n if self.n else None

    @property
    def second_flag_rate(self) -> float | None:
        return (self.both_positive + self.second_only) / self.n if self.n else None

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa; None without cases or when p_e = 1 (see the module docstring)."""
        if not self.n:
            return None
        p1, p2 = self.first_flag_rate, self.second_flag_rate
        expected = p1 * p2 + (1.0 - p1) * (1.0 - p2)
        if expected >= 1.0:
            return None
        return (self.observed - expected) / (1.0 - expected)
