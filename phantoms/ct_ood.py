"""CT series a head-CT model must not analyse: inputs outside its validated domain.

Each kind is written as a CT Image Storage series that routing would send to the ICH model
(Modality CT, BodyPartExamined HEAD or BRAIN, a head-like description), so that only the
model's domain check stands between it and a verdict:

- `plastic_shell`: a plastic head phantom as scanned for QA ("TRAUMA/PLAIN HEAD", BRAIN, 5 mm):
  the head's outline is a uniform plastic shell (~115 HU) filled with water; no bone, no brain;
- `chest`: a chest CT (lungs, mediastinum, spine, ribs) labelled HEAD;
- `mr`: a T1-weighted head MR relabelled as CT (intensities 0-1000 read as HU, no kVp, no kernel);
- `cta`: a CT angiography of the head: contrast in the arteries and sinuses, ContrastBolusAgent
  set (`cta_unlabelled` is the same without the tag, to show what the pixels alone say);
- `noise`: pure noise over the whole stored range.

Geometry, UIDs and the other headers come from the head phantom of the same seed
(phantoms/ct_head.py); nothing here changes what that module writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage

from phantoms.ct_head import HU_MAX, HU_MIN, MATRIX, CtPhantom, make_ct_phantom, series_from_phantom

OOD_KINDS = ("plastic_shell", "chest", "mr", "cta", "cta_unlabelled", "noise")
CHEST_PIXEL_MM = 0.72  # a 370 mm chest field of view


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * sd


def _plastic_shell(ph: CtPhantom, rng: np.random.Generator) -> np.ndarray:
    """The head's outline as a 7 mm plastic shell (115 HU) around water (5 HU)."""
    out = np.full(ph.hu.shape, -1000.0, np.float32)
    shell_px = max(1, int(round(7.0 / ph.pixel_spacing_mm)))
    for k, hu in enumerate(ph.hu):
        body = ndimage.binary_fill_holes(hu > -500)
        inner = ndimage.binary_erosion(body, iterations=shell_px)
        out[k][body] = 115.0
        out[k][inner] = 5.0
    return out + _noise(rng, out.shape, 6.0)


def _chest(n: int, rng: np.random.Generator) -> np.ndarray:
    """Axial chest slices at CHEST_PIXEL_MM: body, fat, lungs with vessels, heart, spine, ribs."""
    c = (np.arange(MATRIX, dtype=np.float32) - (MATRIX - 1) / 2) * CHEST_PIXEL_MM
    x, y = np.meshgrid(c, c)
    out = np.full((n, MATRIX, MATRIX), -1000.0, np.float32)
    a, b = rng.uniform(150, 175), rng.uniform(105, 125)
    for k in range(n):
        t = k / max(n - 1, 1)
        img = out[k]
        body = (x / a) ** 2 + (y / b) ** 2 < 1
        img[body] = -100.0  # subcutaneous fat
        img[(x / (a - 15)) ** 2 + (y / (b - 15)) ** 2 < 1] = 45.0  # muscle and mediastinum
        for side in (-1, 1):
            lung = ((x - side * 0.45 * a) / (0.38 * a)) ** 2 + ((y + 5) / (0.72 * b)) ** 2 < 1
            img[lung] = -850.0
            vessels = lung & (np.sin(x / 7.0 + 3 * t) * np.sin(y / 9.0) > 0.93)
            img[vessels] = -300.0
        heart = ((x + 0.1 * a) / (0.28 * a + 10 * t)) ** 2 + ((y + 0.1 * b) / (0.4 * b)) ** 2 < 1
        img[heart] = 40.0
        img[(x ** 2 + (y - 0.72 * b) ** 2) < 18 ** 2] = 650.0  # vertebral body
        ring = np.abs((x / (a - 8)) ** 2 + (y / (b - 8)) ** 2 - 1) < 0.05
        ribs = ring & (np.sin(np.arctan2(y, x) * 11) > 0.2)
        img[ribs] = 900.0
    return out + _noise(rng, out.shape, 10.0)


def _mr(ph: CtPhantom, rng: np.random.Generator) -> np.ndarray:
    """T1-like contrast on the head phantom's anatomy: fat bright, bone and CSF dark, air 0."""
    hu = ph.hu.astype(np.float32)
    out = np.zeros(hu.shape, np.float32)
    out[(hu > -500) & (hu < -30)] = 900.0  # fat
    out[(hu >= -30) & (hu < 15)] = 220.0  # CSF
    out[(hu >= 15) & (hu < 32)] = 650.0  # white matter
    out[(hu >= 32) & (hu < 100)] = 520.0  # grey matter, blood
    out[hu >= 300] = 60.0  # cortical bone: no signal
    out = ndimage.uniform_filter(out, size=(1, 3, 3))
    return np.clip(out + np.abs(_noise(rng, out.shape, 15.0)), 0, None)


def _cta(ph: CtPhantom, rng: np.random.Generator) -> np.ndarray:
    """Contrast in the arteries (circle of Willis, 300-450 HU), sinuses and cortical veins
    (200-300 HU), and a faintly enhancing brain (+4 HU)."""
    hu = ph.hu.astype(np.float32)
    out = hu.copy()
    c = (np.arange(MATRIX, dtype=np.float32) - (MATRIX - 1) / 2) * ph.pixel_spacing_mm
    for k in range(len(hu)):
        brain = (hu[k] > 15) & (hu[k] < 60)
        if brain.sum() < 50:
            continue
        out[k][brain] += 4.0
        ys, xs = np.nonzero(brain)
        cy, cx = ys.mean(), xs.mean()
        half_h = (ys.max() - ys.min()) / 2.0
        yy, xx = np.meshgrid(c, c, indexing="ij")
        dy = yy - (cy - (MATRIX - 1) / 2) * ph.pixel_spacing_mm
        dx = xx - (cx - (MATRIX - 1) / 2) * ph.pixel_spacing_mm
        t = k / max(len(hu) - 1, 1)
        if t < 0.5:  # circle of Willis and the arteries feeding it
            ring = np.abs(np.hypot(dx / 1.2, dy) - 14.0) < 1.6
            out[k][ring & brain] = rng.uniform(300, 450)
            for sx in (-1, 1):
                mca = (np.abs(dy + 4) < 1.5) & (sx * dx > 14) & (sx * dx < 45)
                out[k][mca & brain] = rng.uniform(300, 450)
        # superior sagittal and transverse sinuses along the posterior inner table
        sinus = (dx ** 2 + (dy - (half_h * ph.pixel_spacing_mm - 9)) ** 2) < 4.5 ** 2
        out[k][sinus] = rng.uniform(200, 300)
        veins = brain & (np.sin(dx / 5.0 + 2 * t) * np.sin(dy / 6.0) > 0.985)
        out[k][veins] = rng.uniform(180, 260)
    return out


def make_ood_phantom(kind: str, slices: int = 20, seed: int = 0) -> CtPhantom:
    """The volume of one out-of-domain kind, on the head phantom's geometry for this seed."""
    if kind not in OOD_KINDS:
        raise ValueError(f"unknown out-of-domain kind {kind!r}; choose one of {', '.join(OOD_KINDS)}")
    head = make_ct_phantom("none", slices, seed)
    rng = np.random.default_rng([seed, 4242, OOD_KINDS.index(kind)])
    if kind == "plastic_shell":
        hu, ph = _plastic_shell(head, rng), replace(head, slice_thickness_mm=5.0)
    elif kind == "chest":
        hu, ph = _chest(slices, rng), replace(head, pixel_spacing_mm=CHEST_PIXEL_MM)
        x0 = float(-(MATRIX - 1) / 2 * CHEST_PIXEL_MM)
        ph = replace(ph, origin_xy_mm=(x0, x0))
    elif kind == "mr":
        hu, ph = _mr(head, rng), head
    elif kind in ("cta", "cta_unlabelled"):
        hu, ph = _cta(head, rng), head
    else:
        hu = rng.uniform(HU_MIN, HU_MAX, head.hu.shape).astype(np.float32)
        ph = head
    return replace(ph, hu=np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16),
                   bleed_area_mm2=np.zeros(slices))


def make_ood_series(kind: str, slices: int = 20, seed: int = 0) -> list[pydicom.Dataset]:
    """The kind's series as datasets, with the headers that kind of series carries (UIDs of
    their own, never the head phantom's)."""
    study_uid = generate_uid(entropy_srcs=["befund-phantom-ct-ood", kind, str(seed), str(slices)])
    datasets = series_from_phantom(make_ood_phantom(kind, slices, seed), study_uid=study_uid)
    for ds in datasets:
        if kind == "plastic_shell":
            ds.StudyDescription = "TRAUMA/PLAIN HEAD"
            ds.SeriesDescription = "Head 5mm"
            ds.BodyPartExamined = "BRAIN"
            ds.SliceThickness = "5"
        elif kind == "chest":
            ds.StudyDescription = "CT Thorax"
            ds.SeriesDescription = "Thorax 5mm"
            ds.ReconstructionDiameter = f"{CHEST_PIXEL_MM * MATRIX:.1f}"
        elif kind == "mr":
            ds.SeriesDescription = "T1 SE head"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "SE"]
            for kw in ("KVP", "ConvolutionKernel", "XRayTubeCurrent", "WindowCenter", "WindowWidth"):
                if kw in ds:
                    delattr(ds, kw)
        elif kind == "cta":
            ds.SeriesDescription = "CTA Kopf"
            ds.ContrastBolusAgent = "Iomeprol 400"
            ds.ContrastBolusRoute = "IV"
        elif kind == "cta_unlabelled":
            ds.SeriesDescription = "Kopf"
        elif kind == "noise":
            ds.SeriesDescription = "Kopf"
    return datasets


def write_ood_series(out: Path, kind: str, slices: int = 20, seed: int = 0) -> list[Path]:
    """Write the kind's series into the folder `out`; return the paths in order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_ood_series(kind, slices, seed):
        path = out / f"ood-{kind}-{seed}-{int(ds.InstanceNumber):04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
