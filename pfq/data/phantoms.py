"""Synthetic prostate mpMRI phantoms: T2w, high-b DWI and ADC with latent ISUP and reader PI-RADS.
This module generates one case in memory; `pfq.data.phantom_set` writes sets of them as NIfTI files
with a manifest (and caches them).

What the phantom is: an analytic pelvis (superellipsoid gland with transition zone, peripheral
zone, anterior fibromuscular stroma, capsule and urethra; rectum, bladder, seminal vesicles, levator
ani and obturator muscles in fat) painted with published T2 and ADC values and smooth tissue texture;
tumours with a latent ISUP grade (irregular margins, zone-dependent contrast), benign focal lesions,
and benign mimics (PZ prostatitis wedges, encapsulated TZ stromal BPH nodules). DWI is simulated at
b=50 and b=1400 from S0 (T2 shine-through) and ADC, degraded as an EPI acquisition, and ADC is
computed from the two degraded images. The PI-RADS label is what a reader would score on the
*degraded* ADC: visible contrast and size, with a perceptual error as large as the map's noise;
mimics, recognised by shape, score 2; then a +-1 flip (10% HQ, 25% LQ).

What it is not: real anatomy, real noise statistics or a validated reader model. It is a study
instrument whose difficulty is tuned so that image quality changes what can be learnt: a logistic
regression on the minimum gland ADC reaches AUC ~0.85 on HQ and ~0.7 on LQ cases.

Axis convention: arrays are (D, H, W) = (k, j, i) of the file's voxel axes, i.e. (S-I, A-P, L-R)
with H increasing anteriorly; NIfTI files hold ``arr.transpose(2, 1, 0)`` (int16 with a
``scl_slope``, see ``save_nifti``) with ``affine = diag(sW, sH, sD, 1)`` (RAS-canonical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft

from pfq.data import degrade as dg

GENERATOR_VERSION = 1  # bump when the phantom model changes, so cached sets are regenerated
B_LOW, B_HIGH = 50.0, 1400.0
DWI_AVERAGES = (1, 1)  # relative averages per b-value (noise / sqrt(averages))
SEVERITY_COLUMNS = tuple(f"severity_{a}" for a in dg.ARTEFACTS)  # the scan's known degradation
MANIFEST_COLUMNS = ("case_id", "t2w", "highb", "adc", "pirads", "isup", "quality") + SEVERITY_COLUMNS
CHANNELS = ("t2w", "highb", "adc")

Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]
Box = tuple[slice, ...]


# ============================================================================ public data types


@dataclass(frozen=True)
class LesionInfo:
    """One focal finding: a tumour (isup >= 1), a benign focal lesion (isup 0) or a mimic."""

    kind: str  # 'tumour' | 'benign' | 'prostatitis' | 'bph_nodule'
    zone: str  # 'pz' | 'tz'
    isup: int
    diameter_mm: float  # equivalent-sphere diameter of the lesion mask
    contrast: float  # visible ADC contrast on the degraded map, (bg - lesion) / bg
    pirads: int  # reader score of this finding (perceptual error included, case-level flip not)


@dataclass
class PhantomCase:
    t2w: np.ndarray  # float32, (D, H, W)
    highb: np.ndarray
    adc: np.ndarray
    pirads: int
    isup: int
    quality: str  # 'hq' | 'lq'
    severity: float  # the worst artefact's severity (all artefacts share it unless set per artefact)
    spacing: tuple[float, float, float]  # mm along (D, H, W)
    # Extras, not written to disk: masks in T2w geometry ('gland', 'pz', 'tz', 'afms', 'urethra',
    # 'lesion', 'mimic') and the per-finding details.
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    lesions: list[LesionInfo] = field(default_factory=list, compare=False)
    severities: dict[str, float] = field(default_factory=dict, compare=False)  # per artefact


# ============================================================================ tissues and frequencies


@dataclass(frozen=True)
class Tissue:
    t2: float  # relative T2w signal (PZ = 1)
    adc: float  # 1e-6 mm^2/s
    s0: float | None = None  # b=0 signal; None: T2 shine-through 0.6 + 0.4 * t2

    @property
    def b0(self) -> float:
        return 0.6 + 0.4 * self.t2 if self.s0 is None else self.s0


FAT = Tissue(1.15, 450.0, s0=0.12)  # fat-suppressed on DWI
MUSCLE = Tissue(0.30, 1400.0)
RECTAL_WALL = Tissue(0.35, 1300.0)
RECTAL_GAS = Tissue(0.04, 0.0, s0=0.02)
RECTAL_GEL = Tissue(1.40, 2600.0)
URINE = Tissue(1.50, 3000.0)
SEMINAL_FLUID = Tissue(1.30, 1900.0)
CAPSULE = Tissue(0.35, 1500.0)
SURGICAL_CAPSULE = Tissue(0.45, 1400.0)
NODULE_RIM = Tissue(0.25, 1300.0)
AFMS = Tissue(0.32, 1450.0)
URETHRA = Tissue(1.10, 2000.0)
GLANDULAR_NODULE = Tissue(0.80, 1600.0)
TUMOUR_ADC = {1: 1135.0, 2: 976.0, 3: 831.0, 4: 700.0, 5: 620.0}

# PI-CAI-like latent grades: 32% of cases without a focal lesion; of lesion cases the index lesion is
# benign (ISUP 0) 22%, ISUP 1 26%, 2 24%, 3 12%, 4 8%, 5 8%  ->  csPCa (ISUP >= 2) in about 35% (PI-CAI
# 28%), and PI-RADS >= 4 in about 45% of HQ cases (PI-CAI 49%), many of them ISUP <= 1 as in PI-CAI.
P_NO_LESION = 0.32
INDEX_ISUP_P = np.array([0.22, 0.26, 0.24, 0.12, 0.08, 0.08])
P_SECOND_LESION = 0.20
P_PZ = 0.70
P_PROSTATITIS = 0.35
P_STROMAL_NODULE = 0.45
READER_FLIP = {"hq": 0.10, "lq": 0.25}
READER_VOXELS = 4  # voxels a reader's eye effectively averages when judging contrast


# ============================================================================ geometry helpers


def smooth_field(shape: Shape, spacing: Spacing, corr_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with Gaussian correlation length ``corr_mm``.

    White noise is drawn directly in the Fourier domain and filtered, saving the forward FFT.
    """
    fz, fy, fx = dg.rfft_freqs(shape, spacing)
    transfer = np.exp(-2.0 * np.pi**2 * corr_mm**2 * (fz**2 + fy**2 + fx**2)).astype(np.float32)
    re = rng.standard_normal(transfer.shape, dtype=np.float32)
    im = rng.standard_normal(transfer.shape, dtype=np.float32)
    spec = (re + np.complex64(1j) * im) * transfer  # complex64 throughout
    out = sfft.irfftn(spec, s=shape, axes=(0, 1, 2)).astype(np.float32)
    return out / max(float(out.std()), 1e-6)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x (LR), y (AP) and z (SI) axes, in that order."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def soft(sd_mm: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (negative inside), ramp ``width`` mm wide."""
    return np.clip(0.5 - sd_mm / width, 0.0, 1.0).astype(np.float32)


def radial_sd(rho: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance along the ray, for a shape with normalised radius ``rho`` at distance ``r``."""
    return (rho - 1.0) * r / np.maximum(rho, 1e-3)


def ellipsoid_rho(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (1 on the surface) of an axis-aligned ellipsoid and the distance to its centre.

    Radii <= 0 leave that axis unbounded (elliptic cylinders).
    """
    rho2 = np.zeros_like(x)
    r2 = np.zeros_like(x)
    for coord, c, r in zip((x, y, z), centre, radii, strict=True):
        if r > 0:
            d = coord - np.float32(c)
            rho2 += (d / np.float32(r)) ** 2
            r2 += d * d
    return np.sqrt(rho2), np.sqrt(r2)


def ellipsoid_sd(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (see ``ellipsoid_rho``)."""
    return radial_sd(*ellipsoid_rho(x, y, z, centre, radii))


@dataclass
class _Canvas:
    """Body-frame coordinates (mm; x = L-R, y = A-P anterior +, z = S-I superior +) and tissue maps."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: Spacing
    rotation: np.ndarray  # body = R @ (grid - origin)
    origin: np.ndarray  # body origin in grid mm (x, y, z)
    t2: np.ndarray
    s0: np.ndarray
    adc: np.ndarray

    @property
    def shape(self) -> Shape:
        return self.t2.shape

    def paint(self, alpha: np.ndarray, tissue: Tissue, box: Box = ()) -> None:
        """Blend a tissue into the maps with occupancy ``alpha`` (over a sub-box if given)."""
        self.paint_values(alpha, tissue.t2, tissue.b0, tissue.adc, box)

    def paint_values(self, alpha: np.ndarray, t2: float, s0: float, adc: float, box: Box = ()) -> None:
        for arr, value in ((self.t2, t2), (self.s0, s0), (self.adc, adc)):
            view = arr[box] if box else arr
            view += alpha * (np.float32(value) - view)

    def box(self, centre: Sequence[float], radius_mm: float) -> Box:
        """Voxel box (D, H, W) containing a body-frame sphere, so small structures cost little."""
        grid_mm = self.origin + self.rotation.T @ np.asarray(centre, dtype=np.float64)  # (x, y, z)
        out = []
        for c_mm, sp, n in zip(grid_mm[::-1], self.spacing, self.shape, strict=True):
            c, r = c_mm / sp + (n - 1) / 2, radius_mm / sp + 1
            out.append(slice(int(max(np.floor(c - r), 0)), int(min(np.ceil(c + r) + 1, n))))
        return tuple(out)

    def coords(self, box: Box = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.x[box], self.y[box], self.z[box]) if box else (self.x, self.y, self.z)


def _make_canvas(shape: Shape, spacing: Spacing, rng: np.random.Generator) -> _Canvas:
    """Grid coordinates rotated by up to +-10 deg about each axis around a jittered gland centre."""
    axes = [
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(sp) for n, sp in zip(shape, spacing, strict=True)
    ]
    gz, gy, gx = np.meshgrid(*axes, indexing="ij")
    origin = np.array([rng.normal(0, 1.5), 3.0 + rng.normal(0, 1.5), rng.normal(0, 2.0)])
    rot = rotation_matrix(rng.uniform(-10, 10, size=3)).astype(np.float32)
    px, py, pz = gx - np.float32(origin[0]), gy - np.float32(origin[1]), gz - np.float32(origin[2])
    x = rot[0, 0] * px + rot[0, 1] * py + rot[0, 2] * pz
    y = rot[1, 0] * px + rot[1, 1] * py + rot[1, 2] * pz
    z = rot[2, 0] * px + rot[2, 1] * py + rot[2, 2] * pz
    maps = [np.full(shape, v, dtype=np.float32) for v in (FAT.t2, FAT.b0, FAT.adc)]
    return _Canvas(x, y, z, spacing, rot, origin, *maps)


# ============================================================================ anatomy


@dataclass
class _Anatomy:
    a: float  # gland semi-axes (mm): L-R, A-P, S-I
    b: float
    c: float
    gland_sd: np.ndarray  # signed distance to the capsule (mm)
    masks: dict[str, np.ndarray]
    rectum_sd: np.ndarray  # signed distance to the rectal outer wall (mm)
    rectal_gas: bool  # gas (strong susceptibility) rather than gel in the rectum


def _gland_axes(rng: np.random.Generator, shape: Shape, spacing: Spacing) -> tuple[float, float, float]:
    """Semi-axes from a log-normal volume (median 42 mL), kept inside the field of view."""
    volume_ml = float(np.clip(42.0 * np.exp(rng.normal(0, 0.4)), 22.0, 110.0))
    ratios = np.array([23.0, 18.0, 21.5]) * rng.uniform(0.9, 1.1, size=3)
    scale = (volume_ml * 1000 / (4 / 3 * np.pi * np.prod(ratios))) ** (1 / 3)
    fov = np.array([shape[2] * spacing[2], shape[1] * spacing[1], shape[0] * spacing[0]])
    a, b, c = np.minimum(ratios * scale, np.array([0.43, 0.36, 0.42]) * fov)
    return float(a), float(b), float(c)


def _paint_muscles(cv: _Canvas, a: float, b: float, c: float, rng: np.random.Generator) -> None:
    """Obturator internus laterally; levator ani as a posterolateral sling below mid-gland."""
    x, y, z = cv.x, cv.y, cv.z
    cv.paint(soft(a + rng.uniform(9, 13) - np.abs(x), 2.0), MUSCLE)
    ring_sd = ellipsoid_sd(x, y, z, (0.0, -0.3 * b, 0.0), (a + 6.0, b + 9.0, 0.0))
    sling = soft(np.abs(ring_sd) - rng.uniform(1.5, 2.5)) * soft(y - 0.2 * b, 4.0) * soft(z - 0.3 * c, 6.0)
    cv.paint(sling, MUSCLE)


def _paint_rectum(cv: _Canvas, b: float, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Rectum behind the gland, curving back superiorly; lumen gas (60%) or gel."""
    x, y, z = cv.x, cv.y, cv.z
    r = rng.uniform(8.0, 12.0)
    curve = -(0.85 * b + 2.0 + r) - 0.15 * np.maximum(z, 0)
    radii = (r * rng.uniform(1.2, 1.5), r, 0.0)  # wider L-R; unbounded S-I (a tube)
    rect_sd = ellipsoid_sd(x, y - curve, z, (rng.normal(0, 2.0), 0.0, 0.0), radii)
    cv.paint(soft(rect_sd), RECTAL_WALL)
    gas = bool(rng.random() < 0.6)
    cv.paint(soft(rect_sd + rng.uniform(2.5, 3.5)), RECTAL_GAS if gas else RECTAL_GEL)
    return rect_sd, gas


def _paint_bladder_and_vesicles(cv: _Canvas, a: float, b: float, c: float, rng: np.random.Generator) -> None:
    """Bladder above the base (muscular wall, urine) and the two seminal vesicles behind it."""
    x, y, z = cv.x, cv.y, cv.z
    rb = rng.uniform(18.0, 28.0)
    centre = (0.0, 0.2 * b + 0.1 * rb, c + 0.8 * rb + rng.uniform(1, 5))
    bladder_sd = ellipsoid_sd(x, y, z, centre, (1.3 * rb, rb, 0.8 * rb))
    cv.paint(soft(bladder_sd), MUSCLE)
    cv.paint(soft(bladder_sd + 2.5), URINE)
    for side in (-1.0, 1.0):
        sv = (side * 0.45 * a, -0.55 * b, c * 0.9 + rng.uniform(2, 6))
        box = cv.box(sv, 14.0)
        cv.paint(soft(ellipsoid_sd(*cv.coords(box), sv, (12.0, 4.5, 6.0))), SEMINAL_FLUID, box)


def _paint_gland(cv: _Canvas, rng: np.random.Generator) -> _Anatomy:
    """Pelvis, then the gland: capsule, AFMS, TZ with benign nodules, surgical capsule, urethra."""
    a, b, c = _gland_axes(rng, cv.shape, cv.spacing)
    _paint_muscles(cv, a, b, c, rng)
    rect_sd, gas = _paint_rectum(cv, b, rng)
    _paint_bladder_and_vesicles(cv, a, b, c, rng)

    x, y, z = cv.x, cv.y, cv.z
    n = np.float32(rng.uniform(2.0, 2.5))
    az = a * np.clip(1.0 + 0.15 * z / c, 0.7, 1.2)  # wider at the base, narrower at the apex
    by = np.where(y < 0, 0.85 * b, b).astype(np.float32)  # posterior surface flattened by the rectum
    rho = (np.abs(x / az) ** n + np.abs(y / by) ** n + np.abs(z / np.float32(c)) ** n) ** (1 / n)
    gland_sd = radial_sd(rho, np.sqrt(x * x + y * y + z * z))
    gland = soft(gland_sd)
    pz = Tissue(_clipped_normal(rng, 1.0, 0.1, 0.8, 1.2), _clipped_normal(rng, 1800, 270, 1300, 2400))
    tz = Tissue(_clipped_normal(rng, 0.55, 0.05, 0.45, 0.65), _clipped_normal(rng, 1340, 140, 1100, 1600))
    cv.paint(gland, pz)
    cv.paint(np.clip(gland - soft(gland_sd + 0.9), 0, 1), CAPSULE)

    # TZ: anterior-central, larger in larger (BPH) glands; it spares the apex and the posterior PZ.
    tz_frac = float(np.clip(0.3 + 0.3 * (a * b * c / 8900.0 - 1.0) + rng.normal(0, 0.05), 0.3, 0.6))
    k = (tz_frac / 0.211) ** (1 / 3)
    tz_radii = (0.65 * a * k, 0.5 * b * k, 0.65 * c * k)
    tz_centre = (rng.normal(0, 1.0), b * rng.uniform(0.2, 0.35), c * rng.uniform(0.05, 0.25))
    tz_sd = ellipsoid_sd(x, y, z, tz_centre, tz_radii)
    tz_a = soft(tz_sd) * gland
    tz_core = soft(tz_sd + 0.8) * gland
    afms_a = gland * (1 - tz_a) * soft(tz_centre[1] + 0.35 * tz_radii[1] - y, 1.5)
    cv.paint(afms_a, AFMS)
    cv.paint(np.clip(tz_a - tz_core, 0, 1), SURGICAL_CAPSULE)
    cv.paint(tz_core, tz)
    _paint_tz_nodules(cv, rng, tz_centre, tz_radii, tz_core)

    ux, uy = tz_centre[0] + rng.normal(0, 0.8), tz_centre[1] + rng.normal(0, 1.0)
    urethra_sd = np.sqrt((x - ux) ** 2 + (y - uy - 0.15 * z) ** 2) - 1.5  # tilted anteriorly
    cv.paint(soft(urethra_sd) * gland, URETHRA)

    masks = {"gland": gland >= 0.5, "tz": tz_a >= 0.5, "afms": (afms_a >= 0.5) & (tz_a < 0.5)}
    masks["pz"] = masks["gland"] & ~masks["tz"] & ~masks["afms"]
    masks["urethra"] = (urethra_sd < 2.0) & masks["gland"]
    return _Anatomy(a, b, c, gland_sd, masks, rect_sd, gas)


def _clipped_normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def _paint_tz_nodules(
    cv: _Canvas, rng: np.random.Generator, centre: Sequence[float], radii: Sequence[float], tz: np.ndarray
) -> None:
    """BPH 'organised chaos': 2-6 bright glandular nodules with thin dark rims (PI-RADS 1)."""
    for _ in range(int(rng.integers(2, 7))):
        pos = np.asarray(centre) + rng.uniform(-0.6, 0.6, size=3) * np.asarray(radii)
        r = rng.uniform(3.0, 7.0)
        box = cv.box(pos, r + 2)
        _, dist = ellipsoid_rho(*cv.coords(box), pos, (r, r, r))
        cv.paint(soft(np.abs(dist - r) - 0.5) * tz[box], CAPSULE, box)
        cv.paint(soft(dist - r + 0.7) * tz[box], GLANDULAR_NODULE, box)


# ============================================================================ lesions and mimics


@dataclass
class _Finding:
    kind: str
    zone: str
    isup: int
    mask: np.ndarray  # bool, full volume (T2w geometry)
    diameter_mm: float


def _sample_isup(rng: np.random.Generator, max_isup: int = 5) -> int:
    p = INDEX_ISUP_P[: max_isup + 1] / INDEX_ISUP_P[: max_isup + 1].sum()
    return int(rng.choice(len(p), p=p))


def _lesion_diameter(isup: int, rng: np.random.Generator) -> float:
    lo, hi = {0: (6, 12), 1: (6, 12), 2: (8, 15)}.get(isup, (10, 22))
    return float(rng.uniform(lo, hi))


def _sample_centre(cv: _Canvas, rng: np.random.Generator, *candidates: np.ndarray) -> np.ndarray:
    """Body-frame position of a random voxel of the first non-empty candidate mask.

    Falls back to the gland centre, so that tiny grids (tests) never fail.
    """
    for mask in candidates:
        flat = np.flatnonzero(mask)
        if flat.size:
            i = flat[int(rng.integers(flat.size))]
            return np.array([cv.x.flat[i], cv.y.flat[i], cv.z.flat[i]], dtype=np.float64)
    return np.zeros(3)


def _finding(cv: _Canvas, kind: str, zone: str, isup: int, box: Box, alpha: np.ndarray) -> _Finding:
    """Record a painted finding: hard mask (alpha >= 0.5) and equivalent-sphere diameter."""
    mask = np.zeros(cv.shape, dtype=bool)
    mask[box] = alpha >= 0.5
    volume = float(mask.sum()) * float(np.prod(cv.spacing))
    return _Finding(kind, zone, isup, mask, float((6.0 * volume / np.pi) ** (1 / 3)))


def _paint_tumour(
    cv: _Canvas,
    anat: _Anatomy,
    zone: str,
    isup: int,
    rough: np.ndarray,
    rng: np.random.Generator,
    avoid: np.ndarray,
    lesion_scale: float = 1.0,
) -> _Finding:
    """An irregular, ill-defined lesion: low T2, ADC by ISUP (ISUP 0: benign focal lesion)."""
    r = lesion_scale * _lesion_diameter(isup, rng) / 2
    radii = r * rng.uniform(0.75, 1.25, size=3)
    radii *= r / np.prod(radii) ** (1 / 3)  # keep the target volume
    deep = anat.masks[zone] & (anat.gland_sd < -1.5) & ~avoid & ~anat.masks["urethra"]
    pos = _sample_centre(cv, rng, deep, anat.masks[zone], anat.masks["gland"])
    box = cv.box(pos, 1.6 * radii.max() + 2)  # the margin perturbation reaches out to r / 0.7
    rho, dist = ellipsoid_rho(*cv.coords(box), pos, radii)
    rho = rho + (0.1 + 0.04 * isup) * np.tanh(rough[box])  # higher grades: more irregular margins
    in_gland = soft(anat.gland_sd[box] - (1.5 if isup >= 4 else 0.0))  # ISUP >= 4 may breach the capsule
    alpha = soft(radial_sd(rho, dist), 1.5 if zone == "tz" else 1.0) * in_gland  # TZ: ill-defined
    if isup == 0:
        adc, t2 = rng.uniform(1100, 1300), rng.uniform(0.45, 0.6)
    else:
        adc, t2 = rng.normal(TUMOUR_ADC[isup], 100), rng.uniform(0.35, 0.45)
    cv.paint_values(alpha, t2, 0.6 + 0.4 * t2, float(max(adc, 450.0)), box)
    return _finding(cv, "tumour" if isup > 0 else "benign", zone, isup, box, alpha)


def _paint_prostatitis(cv: _Canvas, anat: _Anatomy, rng: np.random.Generator) -> _Finding:
    """A wedge of the PZ (apex towards the gland centre, base at the capsule): mildly low T2 and ADC."""
    x, y, z = cv.x, cv.y, cv.z
    theta0 = rng.uniform(-np.pi, 0.0)  # posterior half, where the PZ is thick
    half = np.deg2rad(rng.uniform(12, 28))
    z0, dz = rng.uniform(-0.6, 0.6) * anat.c, rng.uniform(4, 8)
    pi = np.float32(np.pi)
    angle = (np.arctan2(y, x) - np.float32(theta0) + pi) % (2 * pi) - pi  # wrapped to [-pi, pi)
    sd_angle = (np.abs(angle) - half) * np.maximum(np.sqrt(x * x + y * y), 1.0)
    alpha = soft(sd_angle, 1.5) * soft(np.abs(z - z0) - dz, 2.0) * anat.masks["pz"]
    t2 = rng.uniform(0.65, 0.8)
    cv.paint_values(alpha, t2, 0.6 + 0.4 * t2, rng.uniform(1200, 1400))
    return _finding(cv, "prostatitis", "pz", 0, (), alpha)


def _paint_stromal_nodule(cv: _Canvas, anat: _Anatomy, rng: np.random.Generator, avoid: np.ndarray) -> _Finding:
    """Round, well-circumscribed, encapsulated TZ nodule: low T2 and ADC, but benign (PI-RADS 2)."""
    r = rng.uniform(3.0, 7.0)
    deep = anat.masks["tz"] & ~avoid & ~anat.masks["urethra"]
    pos = _sample_centre(cv, rng, deep, anat.masks["gland"])
    box = cv.box(pos, r + 3)
    sd = ellipsoid_sd(*cv.coords(box), pos, (r, r, r))
    in_gland = soft(anat.gland_sd[box])
    cv.paint(soft(np.abs(sd) - 0.6) * in_gland, NODULE_RIM, box)
    alpha = soft(sd + 0.6) * in_gland
    t2 = rng.uniform(0.38, 0.5)
    cv.paint_values(alpha, t2, 0.6 + 0.4 * t2, rng.uniform(1000, 1200), box)
    return _finding(cv, "bph_nodule", "tz", 0, box, alpha)


def _paint_findings(
    cv: _Canvas, anat: _Anatomy, rough: np.ndarray, rng: np.random.Generator, lesion_scale: float = 1.0
) -> list[_Finding]:
    """Mimics first (independent of cancer status), then 0-2 lesions painted over them."""
    findings: list[_Finding] = []
    taken = np.zeros(cv.shape, dtype=bool)
    if rng.random() < P_PROSTATITIS:
        findings.append(_paint_prostatitis(cv, anat, rng))
    if rng.random() < P_STROMAL_NODULE:
        for _ in range(int(rng.integers(1, 3))):
            findings.append(_paint_stromal_nodule(cv, anat, rng, taken))
            taken |= findings[-1].mask
    if rng.random() >= P_NO_LESION:
        isups = [_sample_isup(rng)]
        if rng.random() < P_SECOND_LESION:
            isups.append(_sample_isup(rng, isups[0]))
        for isup in isups:
            zone = "pz" if rng.random() < P_PZ else "tz"
            findings.append(_paint_tumour(cv, anat, zone, isup, rough, rng, taken, lesion_scale))
            taken |= findings[-1].mask
    return findings


def _add_texture(cv: _Canvas, fine: np.ndarray, coarse: np.ndarray, rng: np.random.Generator) -> None:
    """5-10% multiplicative tissue texture; ADC texture partly correlated with T2 texture."""
    amp = np.float32(rng.uniform(0.05, 0.10))
    cv.t2 *= 1.0 + amp * fine
    cv.s0 *= 1.0 + 0.5 * amp * fine
    cv.adc *= 1.0 + np.float32(0.05) * (0.6 * fine + 0.8 * coarse)
    np.clip(cv.adc, 0.0, 3000.0, out=cv.adc)


# ============================================================================ acquisition and reading


@dataclass
class _Acquisition:
    t2w: np.ndarray
    b_high: np.ndarray
    adc: np.ndarray  # from the noisy images: the channel the model sees
    adc_seen: np.ndarray  # from the noise-free degraded images: the contrast a reader perceives
    dwi_shift_vox: np.ndarray


def _mean_or_none(img: np.ndarray, mask: np.ndarray) -> float | None:
    """Noise reference level: the gland mean (None on grids too small to hold the gland)."""
    return float(img[mask].mean()) if mask.any() else None


def _acquire(cv: _Canvas, anat: _Anatomy, s: dg.Severity, rng: np.random.Generator) -> _Acquisition:
    """Clean T2w and b-value images with a per-case gain, degraded with severities ``s``."""
    gland = anat.masks["gland"]
    t2_clean = cv.t2 * np.float32(400.0 * rng.uniform(0.5, 2.0))
    s0 = cv.s0 * np.float32(300.0 * rng.uniform(0.5, 2.0))
    adc_mm2 = cv.adc * np.float32(1e-6)
    b_low = s0 * np.exp(np.float32(-B_LOW) * adc_mm2)
    b_high = s0 * np.exp(np.float32(-B_HIGH) * adc_mm2)
    t2w = dg.degrade_t2w(t2_clean, s, rng, cv.spacing, reference=_mean_or_none(t2_clean, gland))
    # Susceptibility focus: around the rectal wall, much weaker when the rectum holds gel.
    focus = np.exp(-((np.maximum(anat.rectum_sd, 0.0) / 10.0) ** 2)) * (1.0 if anat.rectal_gas else 0.35)
    dwi = dg.degrade_dwi(
        [b_low, b_high],
        s,
        rng,
        cv.spacing,
        focus=focus,
        reference=_mean_or_none(b_low, gland),
        averages=DWI_AVERAGES,
    )
    adc = dg.compute_adc(*dwi.images, B_LOW, B_HIGH)
    adc_seen = dg.compute_adc(*dwi.noiseless, B_LOW, B_HIGH)
    return _Acquisition(t2w, dwi.images[1], adc, adc_seen, dwi.shift_mm / np.float32(cv.spacing[1]))


def pirads_from_contrast(contrast: float, diameter_mm: float) -> int:
    """Reader rule: c < 0.15 -> 2 (not seen), < 0.3 -> 3, else 4 (< 15 mm) or 5 (>= 15 mm)."""
    if contrast < 0.15:
        return 2
    if contrast < 0.30:
        return 3
    return 4 if diameter_mm < 15.0 else 5


def reader_flip_probability(s: float) -> float:
    """10% at HQ severities (<= 0.15), 25% at LQ severities (>= 0.5), linear in between."""
    t = float(np.clip((s - 0.15) / 0.35, 0.0, 1.0))
    return READER_FLIP["hq"] + t * (READER_FLIP["lq"] - READER_FLIP["hq"])


def _visible_contrast(
    seen: np.ndarray, noisy: np.ndarray, lesion: np.ndarray, background: np.ndarray
) -> tuple[float, float]:
    """Visible ADC contrast (bg - lesion) / bg, and the SD of a reader's judgement of it.

    The contrast comes from medians on the noise-free degraded map (blur, distortion, motion and
    signal loss change what is visible; noise is averaged over by eye). Noise makes the judgement
    unreliable instead: SD = robust voxel SD of the noisy background / (bg * sqrt(READER_VOXELS)).
    """
    if lesion.sum() == 0 or background.sum() < 10:
        return 0.0, 0.0
    bg = max(float(np.median(seen[background])), 1.0)
    values = noisy[background]
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    return (bg - float(np.median(seen[lesion]))) / bg, spread / (bg * np.sqrt(READER_VOXELS))


def _read_case(
    findings: list[_Finding], anat: _Anatomy, acq: _Acquisition, s: float, rng: np.random.Generator
) -> tuple[int, list[LesionInfo]]:
    """Score every finding on the degraded ADC, then add reader noise to the case score.

    The reader looks at a lesion where it appears on the ADC map: the maps are pulled back into T2w
    geometry (inverse of the EPI shift, to first order) so that the T2w-space masks select it.
    """
    seen, noisy = dg.apply_ap_shift(np.stack([acq.adc_seen, acq.adc]), -acq.dwi_shift_vox, pile_up=False)
    normal = ~anat.masks["urethra"]
    for f in findings:
        normal &= ~f.mask
    infos = []
    for f in findings:
        contrast, perceptual_sd = _visible_contrast(seen, noisy, f.mask, anat.masks[f.zone] & normal)
        judged = contrast + rng.normal(0, perceptual_sd)
        measured_d = f.diameter_mm * (1.0 + rng.normal(0, 0.05 + 0.1 * s))
        score = pirads_from_contrast(judged, measured_d) if f.kind in ("tumour", "benign") else 2
        infos.append(LesionInfo(f.kind, f.zone, f.isup, round(f.diameter_mm, 2), round(contrast, 4), score))
    pirads = max([i.pirads for i in infos], default=2)
    if rng.random() < reader_flip_probability(s):
        pirads += 1 if rng.random() < 0.5 else -1
    return int(np.clip(pirads, 2, 5)), infos


# ============================================================================ one case


def generate_case(
    seed: int,
    *,
    quality: str,
    shape: Shape = (32, 64, 64),
    spacing: Spacing = (2.0, 1.0, 1.0),
    severity: float | dg.Severity | dict[str, float] | None = None,
    lesion_scale: float = 1.0,
) -> PhantomCase:
    """One patient (anatomy and findings from ``seed``) scanned at ``quality``.

    ``lesion_scale`` multiplies lesion diameters (1: the PI-CAI-like sizes); coarse grids for small
    CPU runs use more, so that lesions span a few voxels.

    The same seed gives the same patient at either quality; the scan (severity, artefacts, reader)
    has its own stream per quality. ``severity`` overrides the draw from the quality's range: one
    number for every artefact, or per artefact (``dg.Severity`` or a dict; missing artefacts 0). The
    reader's error grows with the worst artefact's severity.
    """
    dg.check_quality(quality)
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    shape = tuple(int(v) for v in shape)
    spacing = tuple(float(v) for v in spacing)
    patient = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    scan = np.random.default_rng(np.random.SeedSequence([int(seed), 1 if quality == "hq" else 2]))
    sev = dg.as_severity(dg.sample_severity(quality, scan) if severity is None else severity)
    s = sev.overall

    cv = _make_canvas(shape, spacing, patient)
    anat = _paint_gland(cv, patient)
    fine = smooth_field(shape, spacing, 1.5, patient)
    coarse = smooth_field(shape, spacing, 2.5, patient)
    findings = _paint_findings(cv, anat, coarse, patient, lesion_scale)
    _add_texture(cv, fine, coarse, patient)

    acq = _acquire(cv, anat, sev, scan)
    pirads, infos = _read_case(findings, anat, acq, s, scan)
    masks = dict(anat.masks)
    masks["lesion"] = np.zeros(shape, dtype=bool)
    masks["mimic"] = np.zeros(shape, dtype=bool)
    for f in findings:
        masks["lesion" if f.kind in ("tumour", "benign") else "mimic"] |= f.mask
    return PhantomCase(
        t2w=acq.t2w,
        highb=acq.b_high,
        adc=acq.adc,
        pirads=pirads,
        isup=max([f.isup for f in findings], default=0),
        quality=quality,
        severity=s,
        spacing=spacing,
        masks=masks,
        lesions=infos,
        severities=sev.as_dict(),
    )
