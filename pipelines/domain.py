"""The applicability domain: is this input like what the model was validated on?

A card's `validated_domain` (pipelines.model_card.ValidatedDomain) declares explicit checks on
header values (slice thickness and spacing, pixel spacing, kVp, convolution kernel family,
body part, contrast, stain) and a data-driven out-of-distribution (OOD) score on the pixels:
the Mahalanobis distance of a small feature vector from the training set's mean, with a
threshold that train.py fits so that at most 1 % of held-out in-domain phantoms are refused.

An input outside the domain is "not analysed: outside the model's validated domain (<check>,
<value>, validated <range>)" - never a positive, never a negative. A header value that is
absent is not checked (a check cannot refuse what it cannot read); the OOD score still sees
the pixels.

Features are plain functions over what the pipeline already holds (the windowed CT stack, the
tiles the slide model saw), registered in FEATURES under the name a card gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipelines.findings import NotAnalysable

if TYPE_CHECKING:  # model_card imports this module's registries when it parses a card
    from pipelines.model_card import OodScore, Range, ValidatedDomain

KERNEL_FAMILIES = ("soft", "sharp")
# Convolution kernel names -> family. Soft-tissue kernels are what head CT for bleeds is read
# on; sharp (bone, lung, edge) kernels carry noise the reference model never saw. A name that
# matches neither is not checked ("unknown"), and the OOD score still sees the image.
_KERNEL_PATTERNS: tuple[tuple[str, str], ...] = (
    # GE, generic
    (r"(SOFT|STANDARD|STND|STD\+?|SOFT ?TISSUE|BRAIN|HEAD|SMOOTH|NEURO)", "soft"),
    (r"(BONE\+?|BONEPLUS|LUNG|EDGE|DETAIL|CHEST|SHARP|HD ?LUNG|ULTRA)", "sharp"),
    # Siemens: H/Hr/Hn/Hc/Qr/Br/Jr/J + sharpness number (+ s/f/h suffix)
    (r"(H|HR|HN|HC|QR|BR|JR|J|HU|HP)([0-4][0-9])[A-Z]?( ?\d)?", "soft"),
    (r"(H|HR|HN|HC|QR|BR|JR|J|HU|HP|I|IR)([6-9][0-9])[A-Z]?( ?\d)?", "sharp"),
    # Philips
    (r"(UA|UB|UC|A|B|C|CB)", "soft"),
    (r"(D|E|L|YA|YB|YC|YD|YE|YF)", "sharp"),
    # Canon / Toshiba
    (r"FC(0?[1-9]|1[0-9]|2[0-9])", "soft"),
    (r"FC([3-9][0-9])", "sharp"),
)


def kernel_family(name: str) -> str | None:
    """'soft', 'sharp' or None (unknown) for a ConvolutionKernel value such as STD+, H30s, FC21."""
    text = " ".join(str(name or "").upper().split())
    for pattern, family in _KERNEL_PATTERNS:
        if re.fullmatch(pattern, text):
            return family
    return None


def shown(text: object, limit: int = 16) -> str:
    """A peer's header value as it may appear in a reason or a log: printable, short."""
    clean = re.sub(r"[^A-Za-z0-9+._ -]", "?", str(text or "").strip())
    return clean if len(clean) <= limit else clean[:limit] + "..."


class OutsideDomain(NotAnalysable):
    """The input lies outside the model's validated domain; `check`, `value`, `valid` say where."""

    def __init__(self, subject: str, model: str, check: str, value: str, valid: str):
        self.check, self.value, self.valid = check, value, valid
        super().__init__(f"{subject} not analysed: outside {model}'s validated domain "
                         f"({check} {value}; validated {valid})")


def _same(a: float, b: float, close: float) -> bool:
    if np.isnan(a) or np.isnan(b):  # an absent value starts a run of its own
        return bool(np.isnan(a) and np.isnan(b))
    return abs(a - b) <= close


def _runs(values: Sequence[float], close: float) -> list[tuple[int, int, float]]:
    """(first, last, value) of each run of consecutive values within `close` of the run's first."""
    runs: list[tuple[int, int, float]] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or not _same(values[i], values[start], close):
            runs.append((start, i - 1, float(np.median(values[start:i]))))
            start = i
    return runs


def _which(first: int, last: int, n: int) -> str:
    return f"slice {first + 1} of {n}" if first == last else f"slices {first + 1}-{last + 1} of {n}"


def check_slice_thickness(domain: ValidatedDomain, thickness_mm: Sequence[float | None], subject: str,
                          model: str) -> None:
    """Each slice's SliceThickness (where given) within the validated range; names the slices."""
    valid = domain.slice_thickness_mm
    if valid is None:
        return
    n = len(thickness_mm)
    values = [t if t is not None and t > 0 else float("nan") for t in thickness_mm]
    for first, last, value in _runs(values, 0.05):
        if np.isfinite(value) and not valid.holds(value):
            raise OutsideDomain(subject, model, "slice thickness",
                                f"{value:g} mm in {_which(first, last, n)}", f"{valid} mm")


SPACING_TOLERANCE = 0.02  # positions are rounded in headers; 5.05 mm is a 5 mm spacing


def check_slice_spacing(domain: ValidatedDomain, positions_mm: np.ndarray, subject: str, model: str) -> None:
    """Slice spacing judged against the validated range, run by run (mixed spacing is common:
    4 mm through the skull base, then 7 mm). A single step that is at least 1.5x the median
    step is a gap (slices missing), reported as such, not as a spacing."""
    valid = domain.slice_spacing_mm
    if valid is None or len(positions_mm) < 2:
        return
    steps = np.diff(positions_mm)
    median = float(np.median(steps))
    n = len(positions_mm)
    for first, last, value in _runs(list(steps), 0.1 * median + 0.05):
        if valid.lo * (1 - SPACING_TOLERANCE) <= value <= valid.hi * (1 + SPACING_TOLERANCE):
            continue
        if first == last and value >= 1.5 * median:
            raise NotAnalysable(f"{subject} not analysed: a {value:.1f} mm gap between slices at "
                                f"{positions_mm[first]:.1f} and {positions_mm[first + 1]:.1f} mm "
                                f"(validated spacing {valid} mm); slices are missing")
        # a step between slices i and i+1 belongs to both: name the slices the run spans
        raise OutsideDomain(subject, model, "slice spacing", f"{value:.1f} mm between "
                            f"{_which(first, last + 1, n)}", f"{valid} mm")


def check_value(valid: Range | None, value: float | None, subject: str, model: str, check: str,
                unit: str) -> None:
    if valid is not None and value is not None and np.isfinite(value) and not valid.holds(value):
        raise OutsideDomain(subject, model, check, f"{value:g}{unit}", f"{valid}{unit}")


@dataclass(frozen=True)
class CtHeaderFacts:
    """What the explicit CT checks read, one value per series (the first slice's, where it varies
    the checks that matter read every slice)."""

    kvp: float | None
    kernel: str
    body_part: str
    contrast_agent: bool
    pixel_spacing_mm: float


def check_ct_headers(domain: ValidatedDomain, facts: CtHeaderFacts, subject: str, model: str) -> None:
    """Explicit header checks other than slice geometry (see check_slice_* for those)."""
    check_value(domain.pixel_spacing_mm, facts.pixel_spacing_mm, subject, model, "pixel spacing", " mm")
    check_value(domain.kvp, facts.kvp, subject, model, "kVp", "")
    if domain.convolution_kernel_families and facts.kernel:
        family = kernel_family(facts.kernel)
        if family is not None and family not in domain.convolution_kernel_families:
            raise OutsideDomain(subject, model, "convolution kernel", f"{shown(facts.kernel)} ({family})",
                                "/".join(domain.convolution_kernel_families) + " kernels")
    if domain.body_parts and facts.body_part and facts.body_part.upper() not in domain.body_parts:
        raise OutsideDomain(subject, model, "body part", shown(facts.body_part), "/".join(domain.body_parts))
    if domain.contrast is False and facts.contrast_agent:
        raise OutsideDomain(subject, model, "contrast", "agent named in ContrastBolusAgent",
                            "non-contrast scans only")


# --- the data-driven score --------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSet:
    names: tuple[str, ...]
    compute: Callable[..., np.ndarray]


# HU bands of the CT features, read from the bone window channel ([-800, 2000] HU) of the
# windowed stack the model gets: air, fat/lung, water/soft tissue/blood, dense (plastic,
# contrast, calcification, partial volume), bone.
BODY_HU, FAT_HU, SOFT_HU, DENSE_HU = -500.0, -30.0, 100.0, 300.0


def ct_hu_fractions(windowed: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """Robust statistics of a head CT in the model's own input (N, n_windows, S, S), 0..1.

    Per slice, then the mean over slices: the fraction of the image that is body; of the body,
    the fractions that are fat or lung (< -30 HU), dense (100..300 HU) and bone (> 300 HU) (the
    rest, water to soft tissue, follows from these); the mean HU of soft tissue (the narrowest
    window, 0-80 HU for the reference card) and its standard deviation (noise and texture).
    Measured on phantoms and five out-of-domain kinds, these separate them by a factor of
    two or more in Mahalanobis distance (models/ich_ct/card.yaml, validated_domain.ood.fit).
    """
    wide = int(np.argmax([w for _, w in windows]))  # the widest window sees air to bone
    c, w = windows[wide]
    lo = c - w / 2.0
    hu = lo + windowed[:, wide].astype(np.float32) * w
    narrow = int(np.argmin([w for _, w in windows]))
    nc, nw = windows[narrow]
    body = hu > BODY_HU
    n_body = np.maximum(body.sum(axis=(1, 2)), 1).astype(np.float32)

    def share(mask: np.ndarray) -> np.ndarray:
        return (mask & body).sum(axis=(1, 2)) / n_body

    soft = (hu >= nc - nw / 2.0) & (hu <= nc + nw / 2.0)
    soft_hu = (nc - nw / 2.0) + windowed[:, narrow].astype(np.float32) * nw
    n_soft = np.maximum(soft.sum(axis=(1, 2)), 1).astype(np.float32)
    soft_mean = np.where(soft, soft_hu, 0).sum(axis=(1, 2)) / n_soft
    soft_sq = np.where(soft, soft_hu * soft_hu, 0).sum(axis=(1, 2)) / n_soft
    soft_sd = np.sqrt(np.maximum(soft_sq - soft_mean * soft_mean, 0.0))
    per_slice = np.stack([
        body.mean(axis=(1, 2)),
        share(hu < FAT_HU),
        share((hu > SOFT_HU) & (hu <= DENSE_HU)),
        share(hu > DENSE_HU),
        soft_mean / 100.0,
        soft_sd / 100.0,
    ], axis=1)
    return per_slice.mean(axis=0).astype(np.float64)


TISSUE_OD = 0.3  # summed optical density above which a tile pixel is stained tissue, not glass
TILE_STRIDE = 4  # every 4th pixel of a tile each way: colour statistics need no more


def wsi_tile_colour(tiles: np.ndarray) -> np.ndarray:
    """Per tile with tissue (uint8 (n, H, W, 3), as the model's tiles are read): the mean
    optical density of its stained pixels in red, green and blue (the stain's colour and
    intensity, Beer-Lambert). Colour only: how much of a tile is tissue depends on where the
    tissue's edges fall, and texture differs between the phantoms' synthetic tissue and real
    tissue (a texture statistic refused the README's real CMU-1 slide at 7.2 against a
    threshold of 6.6) for reasons the stain check is not about. The slide's vector is
    `slide_vector` of the rows; tiles with fewer than 10 stained pixels give none."""
    od = -np.log((tiles[:, ::TILE_STRIDE, ::TILE_STRIDE].astype(np.float32) + 1.0) / 256.0)
    stained = od.sum(axis=-1) > TISSUE_OD
    count = stained.sum(axis=(1, 2))
    n = np.maximum(count, 1).astype(np.float32)[:, None]
    mean_od = np.where(stained[..., None], od, 0).sum(axis=(1, 2)) / n
    return mean_od[count >= 10].astype(np.float64)


def slide_vector(rows: Sequence[np.ndarray]) -> np.ndarray | None:
    """The slide's feature vector from wsi_tile_colour's rows: the logarithms of the mean
    densities (a stain's intensity multiplies densities, so in logarithms lab-to-lab variation
    is a shift, which a Mahalanobis ellipsoid covers well). None when no tile had tissue."""
    stacked = [r for r in rows if len(r)]
    if not stacked:
        return None
    return np.log(np.maximum(np.concatenate(stacked).mean(axis=0), 1e-6))


FEATURES: dict[str, FeatureSet] = {
    "wsi_tile_colour_v1": FeatureSet(("log_od_red", "log_od_green", "log_od_blue"), wsi_tile_colour),
    "ct_hu_fractions_v1": FeatureSet(
        ("body_fraction", "fat_or_lung_fraction", "dense_fraction", "bone_fraction", "soft_mean_hu_100",
         "soft_sd_hu_100"), ct_hu_fractions),
}


def mahalanobis(ood: OodScore, features: np.ndarray) -> float:
    """Distance of a feature vector from the card's training mean, in training standard units."""
    d = np.asarray(features, np.float64) - np.asarray(ood.mean, np.float64)
    return float(np.sqrt(max(d @ np.asarray(ood.precision, np.float64) @ d, 0.0)))


def check_ood(ood: OodScore, features: np.ndarray, subject: str, model: str) -> float:
    """The OOD distance; raises OutsideDomain above the card's threshold, naming the feature that
    is furthest out (in training standard deviations) so that a reader sees why."""
    distance = mahalanobis(ood, features)
    if not np.isfinite(distance) or distance > ood.threshold:
        precision = np.asarray(ood.precision, np.float64)
        sd = 1.0 / np.sqrt(np.maximum(np.diag(precision), 1e-12))  # conditional sd, a lower bound
        z = (np.asarray(features, np.float64) - np.asarray(ood.mean, np.float64)) / sd
        k = int(np.nanargmax(np.abs(z))) if np.isfinite(z).any() else 0
        raise OutsideDomain(subject, model, "image statistics unlike the validation data:",
                            f"OOD distance {distance:.1f} (furthest: {ood.names[k]} "
                            f"{features[k]:.3g} vs {ood.mean[k]:.3g})", f"<= {ood.threshold:.1f}")
    return distance
