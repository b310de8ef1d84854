"""Synthetic non-contrast head-CT series, with or without an intracranial bleed.

Each seed is one synthetic patient: head size and shape, position and a small in-plane
rotation, skull and scalp thickness, tissue densities, ventricle size, scanner noise, slice
thickness (2.5-5 mm) and field of view vary. Every case has calcification confounders
(pineal gland, choroid plexus, falx, basal ganglia; > 150 HU) whether it bleeds or not.
Bleeds (acute blood, 50-90 HU) come in four types: intraparenchymal (a lumpy blob in the
brain with an oedema rim), subdural (a crescent along the inner table), epidural (a lens) and
subarachnoid (blood in sulci, Sylvian fissures and basal cisterns), each spanning some but not
all slices. The same seed gives the same patient (anatomy, noise, UIDs) for every finding.

Geometry is computed per slice with whole-array numpy (no per-pixel loops); 300 slices take a
few seconds. Stored value = HU + 1024 (RescaleIntercept -1024, slope 1), unsigned 16 bit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from phantoms.dicom_encoding import TRANSFER_SYNTAXES, encode, transfer_syntax_uid

FINDINGS = ("none", "intraparenchymal", "subdural", "epidural", "subarachnoid")
__all__ = ["FINDINGS", "TRANSFER_SYNTAXES", "CtPhantom", "make_ct_phantom", "make_ct_series",
           "series_from_phantom", "write_ct_series"]

MATRIX = 512
INTERCEPT = -1024
HU_MIN, HU_MAX = -1024, 3071
VISIBLE_AREA_MM2 = 40.0  # a slice "shows" the bleed when its cut through the bleed is this large
MAX_COVERAGE_MM = 160.0  # longer series are reconstructed with overlapping slices
SLICE_THICKNESSES = (2.5, 3.0, 3.75, 4.0, 5.0)


@dataclass(frozen=True)
class CtPhantom:
    """One synthetic series in memory: HU per slice plus the ground truth the training needs."""

    seed: int
    finding: str
    hu: np.ndarray  # (N, 512, 512) int16, inferior to superior
    z_mm: np.ndarray  # (N,) patient z of each slice
    bleed_area_mm2: np.ndarray  # (N,) area of the bleed in each slice
    bleed_mask: np.ndarray  # (N, 512, 512) bool, True where a pixel is painted as blood
    calcification_area_mm2: np.ndarray  # (N,) area of calcification confounders in each slice
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    origin_xy_mm: tuple[float, float]  # patient x, y of the centre of the first pixel
    patient_sex: str

    @property
    def slice_labels(self) -> np.ndarray:
        """1 where the slice shows the bleed, 0 where it does not (bool array)."""
        return self.bleed_area_mm2 >= VISIBLE_AREA_MM2


@dataclass
class _Anatomy:
    a: float  # outer head semi-axes (mm): left-right, anterior-posterior, cranio-caudal
    b: float
    c: float
    skin: float
    scalp: float  # skin + fat
    skull: float
    hu_table: float
    hu_diploe: float
    hu_grey: float
    hu_white: float
    hu_deep: float
    hu_csf: float
    atrophy: float  # 0.8 .. 1.6 widens ventricles and sulci
    z_vent: float
    sulci_n: int
    sulci_phase: float
    sulcal_depth: float
    noise: float
    calcs: list[tuple[float, float, float, float, float, float, float]]  # u, v, z, ru, rv, rz, HU


def _anatomy(rng: np.random.Generator, z_lo: float, z_hi: float) -> _Anatomy:
    a, b, c = rng.uniform(68, 80), rng.uniform(88, 100), rng.uniform(82, 94)
    atrophy = rng.uniform(0.8, 1.6)
    z_vent = rng.uniform(0, 15)
    calcs: list[tuple[float, float, float, float, float, float, float]] = []
    if rng.random() < 0.75:  # pineal gland, midline behind the third ventricle
        r = rng.uniform(1.5, 4.0)
        calcs.append((0.0, rng.uniform(12, 20), z_vent - rng.uniform(6, 12), r, r, r, rng.uniform(160, 700)))
    if rng.random() < 0.65:  # choroid plexus glomus in both trigones
        du, dv, r = rng.uniform(12, 20), rng.uniform(18, 28), rng.uniform(2.0, 4.5)
        hu = rng.uniform(160, 450)
        calcs += [(s * du, dv, z_vent + rng.uniform(-2, 2), r, r, r, hu) for s in (-1.0, 1.0)]
    for _ in range(rng.integers(0, 3)):  # falx plaques on the midline
        calcs.append((0.0, rng.uniform(-60, 50), rng.uniform(-10, 60), 1.2, rng.uniform(3, 9),
                      rng.uniform(3, 9), rng.uniform(200, 1000)))
    if rng.random() < 0.25:  # basal ganglia (globus pallidus), both sides
        du, r = rng.uniform(15, 21), rng.uniform(2.0, 4.0)
        hu = rng.uniform(150, 350)
        calcs += [(s * du, rng.uniform(-4, 2), z_vent - 10, r, r, r, hu) for s in (-1.0, 1.0)]
    # a few more anywhere in the covered brain (dural, vascular), so that short series see them too
    for _ in range(rng.integers(1, 4)):
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.75)
        r = rng.uniform(1.5, 4.0)
        calcs.append((rad * a * np.cos(ang), rad * b * np.sin(ang), rng.uniform(z_lo, z_hi), r, r,
                      r * rng.uniform(0.6, 1.5), rng.uniform(160, 900)))
    return _Anatomy(
        a=a, b=b, c=c, skin=1.5, scalp=1.5 + rng.uniform(2.0, 5.0), skull=rng.uniform(5.0, 8.0),
        hu_table=rng.uniform(1300, 1900), hu_diploe=rng.uniform(650, 950),
        hu_grey=rng.uniform(37, 43), hu_white=rng.uniform(23, 29), hu_deep=rng.uniform(33, 38),
        hu_csf=rng.uniform(2, 12), atrophy=atrophy, z_vent=z_vent,
        sulci_n=int(rng.integers(20, 30)), sulci_phase=rng.uniform(0, 2 * np.pi),
        sulcal_depth=rng.uniform(8, 16), noise=rng.uniform(3.0, 9.0), calcs=calcs,
    )


@dataclass
class _Bleed:
    kind: str
    hu: float
    z0: float
    hz: float  # half extent along z (mm)
    theta0: float = 0.0
    half_angle: float = 0.0
    tmax: float = 0.0
    u0: float = 0.0
    v0: float = 0.0
    ru: float = 0.0
    rv: float = 0.0
    lump: float = 0.0
    lump_phase: float = 0.0
    cisterns: bool = False
    convexity: bool = True


def _bleed(kind: str, rng: np.random.Generator, an: _Anatomy, z_lo: float, z_hi: float,
           spacing: float) -> _Bleed | None:
    if kind == "none":
        return None
    cov = z_hi - z_lo
    # the bleed lies well inside the covered range and spans several slices, never all of them
    zmin = max(z_lo + 0.2 * cov, -0.45 * an.c)
    zmax = min(z_hi - 0.2 * cov, 0.6 * an.c)
    if zmin > zmax:
        zmin = zmax = float(np.clip((z_lo + z_hi) / 2, -0.45 * an.c, 0.6 * an.c))
    z0 = rng.uniform(zmin, zmax)
    hz_cap = max(0.35 * cov, 2.0 * spacing)
    hz_min = min(max(2.5 * spacing, 6.0), hz_cap)
    hu = rng.uniform(55, 88)
    theta0 = rng.uniform(-np.pi, np.pi)
    if kind == "intraparenchymal":
        r = rng.uniform(7, 19)
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45)
        return _Bleed(kind, hu, z0, float(np.clip(r * rng.uniform(0.7, 1.2), hz_min, hz_cap)),
                      u0=rad * an.a * np.cos(ang), v0=rad * an.b * np.sin(ang), ru=r,
                      rv=r * rng.uniform(0.7, 1.4), lump=rng.uniform(0.05, 0.25),
                      lump_phase=rng.uniform(0, 2 * np.pi))
    if kind == "subdural":
        return _Bleed(kind, hu, z0, float(np.clip(rng.uniform(20, 45), hz_min, hz_cap)),
                      theta0=theta0, half_angle=np.deg2rad(rng.uniform(45, 85)),
                      tmax=rng.uniform(5.0, 14.0))
    if kind == "epidural":
        return _Bleed(kind, rng.uniform(60, 90), z0, float(np.clip(rng.uniform(14, 28), hz_min, hz_cap)),
                      theta0=theta0, half_angle=np.deg2rad(rng.uniform(20, 38)),
                      tmax=rng.uniform(10.0, 22.0))
    if kind == "subarachnoid":
        c_lo, c_hi = max(z_lo + 0.2 * cov, -38.0), min(z_hi - 0.2 * cov, -16.0)
        cisterns_in_view = c_lo < c_hi and rng.random() < 0.6
        if cisterns_in_view:
            z0 = rng.uniform(c_lo, c_hi)
        return _Bleed(kind, hu, z0, float(np.clip(rng.uniform(15, 35), hz_min, hz_cap)),
                      theta0=theta0, half_angle=np.deg2rad(rng.uniform(40, 80)),
                      cisterns=cisterns_in_view, convexity=(not cisterns_in_view) or rng.random() < 0.5)
    raise ValueError(f"unknown finding {kind!r}; choose one of {', '.join(FINDINGS)}")


def _geometry(slices: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Slice thickness, slice spacing and the covered z range (head frame) of the series."""
    thickness = float(rng.choice(SLICE_THICKNESSES))
    coverage = min(slices * thickness, MAX_COVERAGE_MM)
    spacing = coverage / slices
    mid = rng.uniform(-5, 25)
    lo_limit, hi_limit = -70.0, 82.0
    mid = float(np.clip(mid, lo_limit + coverage / 2, hi_limit - coverage / 2)) \
        if coverage < hi_limit - lo_limit else (lo_limit + hi_limit) / 2
    z_lo = mid - coverage / 2 + spacing / 2
    z_hi = z_lo + (slices - 1) * spacing
    return thickness, spacing, z_lo, z_hi


def make_ct_phantom(finding: str = "none", slices: int = 32, seed: int = 0) -> CtPhantom:
    """The HU volume and ground truth of one synthetic series; deterministic for a seed."""
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; choose one of {', '.join(FINDINGS)}")
    if slices < 1:
        raise ValueError(f"a series needs at least 1 slice, got {slices}")
    rng = np.random.default_rng([seed, 0])
    thickness, spacing, z_lo, z_hi = _geometry(slices, rng)
    an = _anatomy(rng, z_lo, z_hi)
    fov = rng.uniform(235, 260)
    sp = fov / MATRIX
    shift_u, shift_v = rng.uniform(-12, 12, size=2)
    phi = np.deg2rad(rng.uniform(-8, 8))
    table_z = rng.uniform(-60, 60)
    sex = "F" if rng.random() < 0.5 else "M"
    bleed = _bleed(finding, np.random.default_rng([seed, 1 + FINDINGS.index(finding)]), an, z_lo, z_hi,
                   spacing)
    noise_rng = np.random.default_rng([seed, 99])

    # head-frame coordinates (u: left-right, v: anterior(-)-posterior(+)) of every pixel centre
    coords = (np.arange(MATRIX, dtype=np.float32) - (MATRIX - 1) / 2) * sp
    xx, yy = np.meshgrid(coords - shift_u, coords - shift_v)
    u = (np.cos(phi) * xx + np.sin(phi) * yy).astype(np.float32)
    v = (-np.sin(phi) * xx + np.cos(phi) * yy).astype(np.float32)
    r2 = u * u + v * v
    q2 = (u / an.a) ** 2 + (v / an.b) ** 2
    theta = np.arctan2(v, u)
    sulc_base = an.sulci_n * theta + an.sulci_phase
    lat_ventricles = [((s * (3.0 + 4.0 * an.atrophy)), 4.0, 3.5 * an.atrophy, 20.0, 9.0 * an.atrophy)
                      for s in (-1.0, 1.0)]
    dtheta = None
    if bleed is not None and bleed.kind in ("subdural", "epidural", "subarachnoid"):
        dtheta = np.abs(np.arctan2(np.sin(theta - bleed.theta0), np.cos(theta - bleed.theta0)))
    blob_angle = None
    if bleed is not None and bleed.kind == "intraparenchymal":
        blob_angle = np.arctan2(v - bleed.v0, u - bleed.u0)

    def box(cu: float, cv: float, radius: float, origin: tuple[int, int] = (0, 0),
            shape: tuple[int, int] = (MATRIX, MATRIX)) -> tuple[slice, slice]:
        """Pixel rows and columns (relative to `origin`, within `shape`) that hold a disc of
        `radius` mm around head-frame (cu, cv)."""
        col = (np.cos(phi) * cu - np.sin(phi) * cv + shift_u) / sp + (MATRIX - 1) / 2 - origin[1]
        row = (np.sin(phi) * cu + np.cos(phi) * cv + shift_v) / sp + (MATRIX - 1) / 2 - origin[0]
        half = radius / sp + 2
        r0, r1 = int(np.clip(row - half, 0, shape[0])), int(np.clip(row + half + 1, 0, shape[0]))
        c0, c1 = int(np.clip(col - half, 0, shape[1])), int(np.clip(col + half + 1, 0, shape[1]))
        return slice(r0, r1), slice(c0, c1)

    # everything below works on the head's bounding box only; outside it there is air
    head = box(0.0, 0.0, max(an.a, an.b) + 1.0)
    u, v, r2, q2, theta, sulc_base = (x[head] for x in (u, v, r2, q2, theta, sulc_base))
    dtheta = None if dtheta is None else dtheta[head]
    blob_angle = None if blob_angle is None else blob_angle[head]
    origin, crop = (head[0].start, head[1].start), u.shape

    def ellipsoid(cu, cv, ru, rv, rz, dz) -> tuple[tuple[slice, slice], np.ndarray]:
        """Where the ellipsoid cuts this slice: its box and the mask inside the box."""
        b = box(cu, cv, max(ru, rv), origin, crop)
        return b, ((u[b] - cu) / ru) ** 2 + ((v[b] - cv) / rv) ** 2 + (dz / rz) ** 2 < 1

    inner = an.scalp + an.skull
    zs = z_lo + spacing * np.arange(slices)
    hu = np.empty((slices, MATRIX, MATRIX), dtype=np.int16)
    area = np.zeros(slices)
    bleed_mask = np.zeros((slices, MATRIX, MATRIX), dtype=bool)
    calc_area = np.zeros(slices)
    for k, z in enumerate(zs):
        rho = np.sqrt(q2 + (z / an.c) ** 2)
        p = np.sqrt(r2 + z * z)
        depth = p * (1.0 / np.maximum(rho, 1e-6) - 1.0)  # mm inward from the skin, along the ray
        db = depth - inner  # mm inward from the inner table
        full = np.full((MATRIX, MATRIX), -1000.0, dtype=np.float32)
        img = full[head]  # a view: painting img paints the slice
        img[depth >= 0] = 30.0  # skin
        img[depth >= an.skin] = -100.0  # subcutaneous fat
        skull = (depth >= an.scalp) & (db < 0)
        third = an.skull / 3
        img[skull] = an.hu_table
        img[skull & (depth >= an.scalp + third) & (db < -third)] = an.hu_diploe
        brain = db >= 0
        img[brain] = an.hu_white
        img[brain & (db < 3.0)] = an.hu_grey
        # sulci: radial CSF clefts in the cortical band, wider with atrophy; CSF film on the surface
        g = np.cos(sulc_base + 3.0 * np.sin(2.0 * theta + z / 20.0) + z / 9.0)
        sulcus_w = 0.035 * an.atrophy
        sulci = brain & (db < an.sulcal_depth) & (g > 1.0 - sulcus_w)
        img[sulci | (brain & (db < 0.8 * an.atrophy))] = an.hu_csf
        # interhemispheric fissure with the (slightly dense) falx, above the ventricles
        if z > an.z_vent - 20:
            fissure = brain & (np.abs(u) < 1.2 * an.atrophy) & (np.abs(v) < 0.85 * an.b)
            img[fissure] = an.hu_csf
            img[fissure & (np.abs(u) < 0.45)] = 48.0
        # deep grey nuclei and ventricles near the centre
        dz = z - an.z_vent
        if -24 < dz < 6:
            for side in (-1.0, 1.0):
                b, m = ellipsoid(side * 15, -1.0, 9.0, 13.0, 12.0, dz + 9)
                img[b][m & brain[b]] = an.hu_deep
        for cu, cv, ru, rv, rz in lat_ventricles:
            if abs(dz) < rz:
                b, m = ellipsoid(cu, cv, ru, rv, rz, dz)
                img[b][m] = an.hu_csf
        if abs(dz + 14) < 6:
            b, m = ellipsoid(0.0, 4.0, 1.2 * an.atrophy, 9.0, 6.0, dz + 14)
            img[b][m] = an.hu_csf
        sylvian = None
        if -40 < z < an.z_vent:  # Sylvian fissures and, lower down, the basal cisterns
            sylvian = brain & (np.abs(v + 8 + 0.1 * np.abs(u)) < 1.2 * an.atrophy) & (np.abs(u) > 22)
            img[sylvian] = an.hu_csf
        cisterns = None
        if -40 < z < -12:
            ring = (u / 16) ** 2 + ((v - 2) / 13) ** 2
            cisterns = brain & (ring > 0.55) & (ring < 1.0)
            img[cisterns] = an.hu_csf
        for cu, cv, cz, ru, rv, rz, chu in an.calcs:
            if abs(z - cz) < rz:
                b, m = ellipsoid(cu, cv, ru, rv, rz, z - cz)
                img[b][m] = chu
                calc_area[k] += float(m.sum()) * sp * sp
        if bleed is not None and abs(z - bleed.z0) < bleed.hz:
            mask = _bleed_mask(bleed, z, u, v, db, brain, g, dtheta, blob_angle, sylvian, cisterns, img)
            area[k] = float(mask.sum()) * sp * sp
            bleed_mask[k][head] = mask
        full += noise_rng.standard_normal((MATRIX, MATRIX), dtype=np.float32) * an.noise
        hu[k] = np.clip(np.rint(full), HU_MIN, HU_MAX)

    x0 = float(-(MATRIX - 1) / 2 * sp)
    return CtPhantom(seed=seed, finding=finding, hu=hu, z_mm=zs + table_z, bleed_area_mm2=area,
                     bleed_mask=bleed_mask, calcification_area_mm2=calc_area,
                     pixel_spacing_mm=float(sp), slice_thickness_mm=thickness,
                     slice_spacing_mm=float(spacing), origin_xy_mm=(x0, x0), patient_sex=sex)


def _bleed_mask(bl: _Bleed, z: float, u, v, db, brain, g, dtheta, blob_angle, sylvian, cisterns,
                img: np.ndarray) -> np.ndarray:
    """Paint the bleed into `img` for the slice at head-frame `z`; return the painted mask."""
    fz = 1.0 - ((z - bl.z0) / bl.hz) ** 2  # 0 at the ends of the bleed, 1 in its middle
    blood = bl.hu
    if bl.kind == "intraparenchymal":
        lumpy = 1.0 + bl.lump * np.sin(3 * blob_angle + bl.lump_phase)
        rho = ((u - bl.u0) / (bl.ru * lumpy)) ** 2 + ((v - bl.v0) / (bl.rv * lumpy)) ** 2 \
            + ((z - bl.z0) / bl.hz) ** 2
        img[brain & (rho >= 1) & (rho < 1.6)] -= 7.0  # oedema rim
        mask = brain & (rho < 1)
    elif bl.kind == "subdural":  # crescent: thin, long, tapering ends
        prof = np.clip(1.0 - dtheta / bl.half_angle, 0, None)
        t = bl.tmax * np.sin(np.pi / 2 * prof) ** 1.5 * np.sqrt(max(fz, 0.0))
        mask = brain & (db < t)
    elif bl.kind == "epidural":  # lens: short, thick, convex towards the brain
        prof = np.clip(1.0 - (dtheta / bl.half_angle) ** 2, 0, None)
        t = bl.tmax * np.sqrt(prof) * np.sqrt(max(fz, 0.0))
        mask = brain & (db < t)
    else:  # subarachnoid: blood fills and widens sulci, fissures and cisterns
        mask = np.zeros(u.shape, dtype=bool)
        if bl.convexity:
            sector = dtheta < bl.half_angle
            mask |= brain & sector & (db < 0.75 * 14.0) & ((g > 0.93) | (db < 1.5))
        if bl.cisterns and cisterns is not None:
            mask |= cisterns
        if sylvian is not None:  # both fissures with cisternal blood, else the side of the sector
            mask |= sylvian if bl.cisterns else sylvian & ((u > 0) == (np.cos(bl.theta0) >= 0))
    img[mask] = blood
    return mask


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["befund-phantom-ct", *[str(p) for p in parts]])


def make_ct_series(finding: str = "none", slices: int = 32, seed: int = 0,
                   transfer_syntax: str = "explicit", patient_name: str | None = None,
                   study_uid: str | None = None, gantry_tilt_deg: float = 0.0) -> list[Dataset]:
    """The series as pydicom datasets (inferior to superior), encoded in `transfer_syntax`."""
    return series_from_phantom(make_ct_phantom(finding, slices, seed), transfer_syntax, patient_name,
                               study_uid, gantry_tilt_deg)


def tilt_geometry(ph: CtPhantom, gantry_tilt_deg: float) -> tuple[int, float]:
    """(rows each slice's image moves down against the last, the exact tilt in degrees) of a
    series written with the gantry tilted by about `gantry_tilt_deg` (a whole-pixel shear)."""
    if not gantry_tilt_deg:
        return 0, 0.0
    step = int(round(ph.slice_spacing_mm * np.tan(np.radians(gantry_tilt_deg)) / ph.pixel_spacing_mm))
    return step, float(np.degrees(np.arctan2(step * ph.pixel_spacing_mm, ph.slice_spacing_mm)))


def series_from_phantom(ph: CtPhantom, transfer_syntax: str = "explicit", patient_name: str | None = None,
                        study_uid: str | None = None, gantry_tilt_deg: float = 0.0) -> list[Dataset]:
    """Datasets for a phantom already in memory (keeps its ground truth at hand for tests).

    `gantry_tilt_deg` writes the series as a tilted gantry acquires it: every slice in one
    oblique plane (ImageOrientationPatient rows along x, columns along (0, cos t, -sin t)),
    the table advancing along z, so each image sits `tilt_geometry` rows lower than the one
    before (air fills in). Shear correction of the stack gives back the phantom's volume.
    """
    ts = transfer_syntax_uid(transfer_syntax)
    shear_rows, tilt = tilt_geometry(ph, gantry_tilt_deg)
    finding, seed, slices = ph.finding, ph.seed, len(ph.hu)
    study_uid = study_uid or _uid(seed, finding, slices, "study")
    series_uid = _uid(study_uid, seed, finding, slices, "series")
    frame_uid = _uid(study_uid, seed, "frame-of-reference")
    day = dt.date(2024, 1, 1) + dt.timedelta(days=seed % 730)
    birth = dt.date(1935 + seed % 60, 1 + seed % 12, 1 + seed % 28)
    age = day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))
    study_time = f"{8 + seed % 10:02d}{seed % 60:02d}00"

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = CTImageStorage
    base.StudyDate = base.SeriesDate = base.AcquisitionDate = base.ContentDate = day.strftime("%Y%m%d")
    base.StudyTime = study_time
    base.SeriesTime = base.AcquisitionTime = base.ContentTime = f"{study_time[:4]}30"
    base.AccessionNumber = f"ACC{seed:07d}"[-16:]
    base.Modality = "CT"
    base.Manufacturer = "befund"
    base.InstitutionName = "befund Phantom-Klinik"
    base.ReferringPhysicianName = ""
    base.StationName = "PHANTOM-CT"
    base.StudyDescription = "CT Kopf nativ"
    base.SeriesDescription = f"Kopf nativ {ph.slice_thickness_mm:g}mm"
    base.ManufacturerModelName = "befund head-CT phantom"
    base.PatientName = patient_name or f"PHANTOM^CT-{seed}"
    base.PatientID = f"PHCT-{seed}"
    base.PatientBirthDate = birth.strftime("%Y%m%d")
    base.PatientSex = ph.patient_sex
    base.PatientAge = f"{age:03d}Y"
    base.BodyPartExamined = "HEAD"
    base.SliceThickness = f"{ph.slice_thickness_mm:g}"
    base.KVP = "120"
    base.DataCollectionDiameter = "500"
    base.SoftwareVersions = "befund-phantom 1"
    base.ReconstructionDiameter = f"{ph.pixel_spacing_mm * MATRIX:.2f}"
    base.GantryDetectorTilt = f"{tilt:.2f}" if shear_rows else "0"
    base.TableHeight = "150"
    base.RotationDirection = "CW"
    base.XRayTubeCurrent = 300
    base.ConvolutionKernel = "SOFT"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = f"{seed % 100000}"
    base.SeriesNumber = 2
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.FrameOfReferenceUID = frame_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = base.Columns = MATRIX
    base.PixelSpacing = [f"{ph.pixel_spacing_mm:.6f}"] * 2
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 0
    base.WindowCenter = "40"
    base.WindowWidth = "80"
    base.RescaleIntercept = str(INTERCEPT)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.LossyImageCompression = "00"

    out = []
    x0, y0 = ph.origin_xy_mm
    sin_t, cos_t = np.sin(np.radians(tilt)), np.cos(np.radians(tilt))
    if shear_rows:
        base.ImageOrientationPatient = [1, 0, 0, 0, f"{cos_t:.7f}", f"{-sin_t:.7f}"]
    normal = np.array([0.0, sin_t, cos_t])
    col = np.array([0.0, cos_t, -sin_t])
    for k in range(slices):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = _uid(series_uid, k)
        ds.InstanceNumber = k + 1
        pixels = ph.hu[k]
        if shear_rows:
            # the normal advances by the spacing, the image origin by -k*shear rows in its plane
            x, y, z = np.array([x0, y0, ph.z_mm[0]]) + k * ph.slice_spacing_mm * normal \
                - k * shear_rows * ph.pixel_spacing_mm * col
            shift = min(k * shear_rows, MATRIX) if shear_rows > 0 else max(k * shear_rows, -MATRIX)
            pixels = np.full_like(pixels, HU_MIN)
            if shift >= 0:
                pixels[shift:] = ph.hu[k][:MATRIX - shift]
            else:
                pixels[:shift] = ph.hu[k][-shift:]
        else:
            x, y, z = x0, y0, ph.z_mm[k]
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelData = (pixels.astype(np.int32) - INTERCEPT).astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds["PixelData"].VR = "OW"
        if ts != ExplicitVRLittleEndian:
            encode(ds, transfer_syntax)
        out.append(ds)
    return out


def write_ct_series(out: Path, finding: str = "none", slices: int = 32, seed: int = 0,
                    transfer_syntax: str = "explicit", patient_name: str | None = None,
                    study_uid: str | None = None, gantry_tilt_deg: float = 0.0) -> list[Path]:
    """Write the series as Part 10 files into the folder `out`; return their paths in order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_ct_series(finding, slices, seed, transfer_syntax, patient_name, study_uid,
                             gantry_tilt_deg):
        path = out / f"ct-{seed}-{finding}-{int(ds.InstanceNumber):04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
