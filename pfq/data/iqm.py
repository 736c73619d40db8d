"""Image-quality metrics (IQMs) per case and channel, for grading scans HQ/LQ without a reader.

Every measure is computed on the native intensities of each file after reorientation to the
closest canonical orientation (flips and axis permutations only: no interpolation, no
normalisation), so noise keeps its native statistics. Measures use two regions:

- valid V: the bounding box of the file's non-zero voxels. Zero slabs around it are padding that
  tools add, not data; zeros inside it (clipped ADC, signal voids) are data.
- foreground F: voxels of V brighter than 5% of V's 98th percentile (excludes gas, voids and clipped
  ADC). A small prostate field of view holds no air, so nothing here needs a background region.

Every measure is invariant to the intensity scale (ratios, normalised correlations, fractions of
voxels), because scanners, protocols and the phantoms' per-case gain all change it. Per channel c
(`t2w`, `highb`, `adc`):

- `c_snr`: median(I[F]) / sigma, sigma = median(|HHH|) / 0.6745 over the 2x2x2 blocks inside F,
  HHH the finest 3-D Haar diagonal detail (Donoho's robust noise estimator; no background needed).
- `c_efc`: MRIQC's entropy focus criterion, with the voxels outside V as its frame mask.
- `c_fwhm_inplane`, `c_fwhm_slice` (mm): Gaussian-equivalent smoothness from the ratio of the
  high-passed log image's autocovariance at lags 1 and 2 (sigma^2 = 3 / (4 ln(C1/C2)) voxels). White
  noise only adds to lag 0, so unlike AFNI's lag-0/lag-1 estimator it is not pulled towards zero by
  noise. NaN where C1 <= C2 (noise-dominated images).
- `c_ghost`: phase-encode ghosting; log of the largest |autocorrelation| of the high-passed log
  image at lags N/k (k = 2..8) along the phase-encode axis (H, anterior-posterior for axial prostate
  scans) over the same along the read-out axis (W). Replicas shifted by N/k (every k-th line wrong;
  EPI Nyquist: k = 2) raise it; anatomy, alike in both axes, cancels to first order, and so does
  white noise (it shrinks both autocorrelations alike).
- `c_inu` (T2w, high-b): bias-field strength, log(P95 / P5) over F of exp(a degree-3 polynomial
  least-squares fit to log I over F).
- `c_tail` (T2w, high-b): P99.95(I[V]) / median(I[F]), bright outliers (MRIQC's wm2max, inverted).
- `adc_clip_frac`: fraction of V at ADC <= 0 or at the map's maximum (scanners clip ADC to a range).
- `highb_floor_frac`: fraction of V below 2 sigma on the high-b image (signal at the Rician floor).
- `t2_adc_ngf`: normalised-gradient-field alignment of log T2w and log ADC (Gaussian-smoothed, sigma
  1 voxel), sum<gT,gA>^2 / sum|gT|^2|gA|^2 over F (1: edges aligned), on T2w's grid; EPI distortion
  and misregistration lower it.

Header checks against the PI-RADS v2.1 technical minima (axial acquisitions assumed: the slice
axis is D after reorientation; the phase-encode direction is not in a NIfTI header, so the
coarser in-plane spacing is checked against the phase limit and the finer against the frequency
limit): T2w slices <= 3 mm and in-plane <= 0.7 x 0.4 mm; DWI slices <= 4 mm and in-plane <= 2.5 mm.
Voxel spacing includes any slice gap. The high-b value itself is not in a NIfTI header and is not
checked. These are reported, not used by the grader.

IQMs are cached per case under the preprocessing cache's root (`iqm/<kk>/<key>.json`, key =
sha256(IQM_VERSION + the three files' content hashes)), like preprocessed volumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation
from scipy import ndimage

from pfq.data.manifest import IMAGE_COLUMNS, CaseRecord, Problem
from pfq.data.preprocess import CaseError, Volume, aligned_channels, grid_problems, output_grid, read_case
from pfq.io import atomic_write_text

IQM_VERSION = 1  # bump when any measure changes: it keys the cache

# PI-RADS v2.1 technical minima (mm): slice thickness, coarser and finer in-plane dimension.
PIRADS_T2W = {"slice": 3.0, "inplane_phase": 0.7, "inplane_freq": 0.4}
PIRADS_DWI = {"slice": 4.0, "inplane_phase": 2.5, "inplane_freq": 2.5}
SPACING_TOL_MM = 1e-3

GHOST_PERIODS = range(2, 9)
HIGHPASS_SIGMA_VOX = 2.0  # removes anatomy's large scales before the autocorrelation measures
FG_FRACTION = 0.05  # foreground: brighter than this fraction of V's 98th percentile


def iqm_names() -> list[str]:
    """Column names of the image measures, in output order (header checks follow)."""
    names = []
    for c in IMAGE_COLUMNS:
        names += [f"{c}_snr", f"{c}_efc", f"{c}_fwhm_inplane", f"{c}_fwhm_slice", f"{c}_ghost"]
        if c != "adc":
            names += [f"{c}_inu", f"{c}_tail"]
    return names + ["adc_clip_frac", "highb_floor_frac", "t2_adc_ngf"]


HEADER_NAMES = ("t2w_slice_mm", "t2w_inplane_mm", "dwi_slice_mm", "dwi_inplane_mm", "t2w_pirads_ok", "dwi_pirads_ok")


# ----------------------------------------------------------------------------- regions


def valid_region(img: np.ndarray) -> np.ndarray:
    """Bounding box of the non-zero voxels: padding outside it is not data."""
    mask = np.zeros(img.shape, dtype=bool)
    nz = np.nonzero(img)
    if nz[0].size == 0:
        return mask
    mask[tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)] = True
    return mask


def foreground(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Voxels of ``valid`` above FG_FRACTION of its 98th percentile (no gas, voids or clipped ADC)."""
    top = float(np.percentile(img[valid], 98)) if valid.any() else 0.0
    return valid & (img > FG_FRACTION * top)


# ----------------------------------------------------------------------------- measures


def haar_sigma(img: np.ndarray, mask: np.ndarray) -> float:
    """Noise SD from the finest 3-D Haar diagonal detail over 2x2x2 blocks fully inside ``mask``."""
    d, h, w = (n - n % 2 for n in img.shape)
    if min(d, h, w) < 2:
        raise ValueError(f"image of shape {img.shape} is too small for a noise estimate (needs 2 voxels per axis)")
    x = img[:d, :h, :w].astype(np.float64).reshape(d // 2, 2, h // 2, 2, w // 2, 2)
    sign = np.array([1.0, -1.0])
    hhh = np.einsum("aibjck,i,j,k->abc", x, sign, sign, sign) / np.sqrt(8.0)
    inside = mask[:d, :h, :w].reshape(d // 2, 2, h // 2, 2, w // 2, 2).all(axis=(1, 3, 5))
    values = hhh[inside] if inside.sum() >= 16 else hhh.reshape(-1)
    return float(np.median(np.abs(values)) / 0.6745)


def snr(img: np.ndarray, fg: np.ndarray) -> float:
    sigma = haar_sigma(img, fg)
    return float(np.median(img[fg]) / sigma) if sigma > 0 else float("inf")


def efc(img: np.ndarray, framemask: np.ndarray | None = None) -> float:
    """Entropy focus criterion exactly as MRIQC's ``mriqc.qc.anatomical.efc`` (framemask: 1 = not data)."""
    data = np.asarray(img, dtype=np.float64)
    keep = np.ones(data.shape, bool) if framemask is None else ~np.asarray(framemask, bool)
    n_vox = float(keep.sum())
    efc_max = 1.0 * n_vox * (1.0 / np.sqrt(n_vox)) * np.log(1.0 / np.sqrt(n_vox))
    x = data[keep]
    b_max = np.sqrt((x**2).sum())
    return float((1.0 / efc_max) * np.sum((x / b_max) * np.log((x + 1e-16) / b_max)))


def _highpass(img: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """log I minus its Gaussian-smoothed self (normalised convolution over F), zero outside F.

    In the log domain a multiplicative bias field and the intensity scale are additive and smooth,
    so the high-pass removes them."""
    x = np.where(fg, np.log(np.where(fg, img, 1.0)), 0.0).astype(np.float64)
    weight = ndimage.gaussian_filter(fg.astype(np.float64), HIGHPASS_SIGMA_VOX, mode="constant")
    smooth = ndimage.gaussian_filter(x, HIGHPASS_SIGMA_VOX, mode="constant") / np.maximum(weight, 1e-6)
    return np.where(fg, x - smooth, 0.0)


def _lag_cov(r: np.ndarray, fg: np.ndarray, axis: int, lag: int) -> float:
    n = r.shape[axis]
    if lag >= n:
        return float("nan")
    a = np.take(r, np.arange(n - lag), axis=axis)
    b = np.take(r, np.arange(lag, n), axis=axis)
    both = np.take(fg, np.arange(n - lag), axis=axis) & np.take(fg, np.arange(lag, n), axis=axis)
    return float((a * b)[both].mean()) if both.any() else float("nan")


def fwhm_axis(r: np.ndarray, fg: np.ndarray, axis: int) -> float:
    """Gaussian-equivalent FWHM (voxels) along ``axis`` from autocovariances at lags 1 and 2."""
    c1, c2 = _lag_cov(r, fg, axis, 1), _lag_cov(r, fg, axis, 2)
    if not (np.isfinite(c1) and np.isfinite(c2)) or c1 <= 0 or c2 <= 0 or c1 <= c2:
        return float("nan")
    sigma2 = 3.0 / (4.0 * np.log(c1 / c2))
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * np.sqrt(sigma2))


def _circular_acf(r: np.ndarray, axis: int) -> np.ndarray:
    """Normalised circular autocorrelation along ``axis`` (summed over the other axes)."""
    spec = np.fft.rfft(r, axis=axis)
    power = (spec * spec.conj()).real
    acf = np.fft.irfft(power, n=r.shape[axis], axis=axis)
    acf = acf.sum(axis=tuple(a for a in range(r.ndim) if a != axis))
    return acf / max(acf[0], 1e-30)


def ghost(r: np.ndarray) -> float:
    """log of the largest |autocorrelation| at lags N/k along H over the same along W.

    A ratio: white noise shrinks both alike, so it cancels."""
    acf_h, acf_w = _circular_acf(r, 1), _circular_acf(r, 2)

    def peak(acf: np.ndarray) -> float:
        n = acf.shape[0]
        lags = {round(n / k) for k in GHOST_PERIODS if round(n / k) >= 2}
        return max(abs(float(acf[lag])) for lag in lags) if lags else 0.0

    return float(np.log((peak(acf_h) + 1e-6) / (peak(acf_w) + 1e-6)))


def _poly_design(coords: np.ndarray, order: int = 3) -> np.ndarray:
    """Monomials z^l y^m x^n, l + m + n <= order, of coordinates scaled to [-1, 1] (rows: voxels)."""
    cols = []
    for total in range(order + 1):
        for lz in range(total + 1):
            for my in range(total - lz + 1):
                nx = total - lz - my
                cols.append(coords[:, 0] ** lz * coords[:, 1] ** my * coords[:, 2] ** nx)
    return np.stack(cols, axis=1)


def inu(img: np.ndarray, fg: np.ndarray, max_voxels: int = 20_000) -> float:
    """Bias-field strength: log(P95 / P5) of exp(cubic fit to log I) over F."""
    idx = np.argwhere(fg & (img > 0))
    if len(idx) < 40:
        return float("nan")
    scale = np.maximum(np.asarray(img.shape, float) - 1, 1.0)
    step = max(1, len(idx) // max_voxels)  # a regular subsample: deterministic and enough for 20 terms
    sub = idx[::step]
    design = _poly_design(2.0 * sub / scale - 1.0)
    # Normal equations: 20 x 20, far cheaper than an SVD of the tall design; the ridge keeps them solvable.
    gram = design.T @ design
    gram[np.diag_indices_from(gram)] += 1e-9 * np.trace(gram)
    coef = np.linalg.solve(gram, design.T @ np.log(img[tuple(sub.T)].astype(np.float64)))
    fit = _poly_design(2.0 * idx / scale - 1.0) @ coef
    lo, hi = np.percentile(fit, [5, 95])
    return float(hi - lo)


def tail(img: np.ndarray, valid: np.ndarray, fg: np.ndarray) -> float:
    return float(np.percentile(img[valid], 99.95) / np.median(img[fg]))


def clip_fraction(adc: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of V at or below zero or at the map's maximum (a scanner's clipping range)."""
    x = adc[valid]
    top = float(x.max())
    at_top = x >= top * (1.0 - 1e-4) if top > 0 else np.zeros(x.shape, bool)
    return float(np.mean((x <= 0) | at_top))


def floor_fraction(img: np.ndarray, valid: np.ndarray, sigma: float) -> float:
    return float(np.mean(img[valid] < 2.0 * sigma))


def ngf_alignment(a: np.ndarray, b: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Normalised-gradient-field alignment of two images (lightly smoothed against noise) over ``mask``."""
    la, lb = (np.log(np.maximum(x.astype(np.float64), 1e-30)) for x in (a, b))
    ga = np.gradient(ndimage.gaussian_filter(np.where(mask, la, np.median(la[mask])), 1.0), *spacing)
    gb = np.gradient(ndimage.gaussian_filter(np.where(mask, lb, np.median(lb[mask])), 1.0), *spacing)
    dot = sum(x * y for x, y in zip(ga, gb, strict=True))
    na = sum(x * x for x in ga)
    nb = sum(y * y for y in gb)
    den = float((na * nb)[mask].sum())
    return float((dot * dot)[mask].sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- a case


def _native(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) array reoriented without interpolation, and its (D, H, W) spacing in mm."""
    _, affine, ornt = output_grid(vol, None)
    data = np.ascontiguousarray(apply_orientation(vol.data, ornt).transpose(2, 1, 0), dtype=np.float32)
    return data, np.linalg.norm(affine[:3, :3], axis=0)[::-1]


def _mean_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def channel_iqms(name: str, img: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The per-channel measures of one (D, H, W) native image."""
    valid = valid_region(img)
    fg = foreground(img, valid)
    r = _highpass(img, fg)
    out = {
        f"{name}_snr": snr(img, fg),
        f"{name}_efc": efc(img, ~valid),
        f"{name}_fwhm_inplane": _mean_finite([fwhm_axis(r, fg, 1) * spacing[1], fwhm_axis(r, fg, 2) * spacing[2]]),
        f"{name}_fwhm_slice": fwhm_axis(r, fg, 0) * float(spacing[0]),
        f"{name}_ghost": ghost(r),
    }
    if name != "adc":
        out[f"{name}_inu"] = inu(img, fg)
        out[f"{name}_tail"] = tail(img, valid, fg)
    if name == "adc":
        out["adc_clip_frac"] = clip_fraction(img, valid)
    if name == "highb":
        out["highb_floor_frac"] = floor_fraction(img, valid, haar_sigma(img, fg))
    return out


def header_checks(spacings: dict[str, np.ndarray]) -> dict[str, float]:
    """Voxel spacings and pass (1) / fail (0) against the PI-RADS v2.1 minima (see the module docstring)."""
    out = {}
    for key, role, limits in (("t2w", "t2w", PIRADS_T2W), ("dwi", "highb", PIRADS_DWI)):
        sp = spacings[role]
        coarse, fine = max(sp[1], sp[2]), min(sp[1], sp[2])
        out[f"{key}_slice_mm"] = float(sp[0])
        out[f"{key}_inplane_mm"] = float(coarse)
        ok = (
            sp[0] <= limits["slice"] + SPACING_TOL_MM
            and coarse <= limits["inplane_phase"] + SPACING_TOL_MM
            and fine <= limits["inplane_freq"] + SPACING_TOL_MM
        )
        out[f"{key}_pirads_ok"] = float(ok)
    return out


def _combine(native: dict[str, tuple[np.ndarray, np.ndarray]], t2: np.ndarray, adc: np.ndarray) -> dict[str, float]:
    out = {}
    for role in IMAGE_COLUMNS:
        out.update(channel_iqms(role, *native[role]))
    out["t2_adc_ngf"] = ngf_alignment(t2, adc, foreground(t2, valid_region(t2)) & (adc > 0), native["t2w"][1])
    out.update(header_checks({role: sp for role, (_, sp) in native.items()}))
    return {k: out[k] for k in iqm_names() + list(HEADER_NAMES)}


def volume_iqms(volumes: dict[str, Volume]) -> dict[str, float]:
    """Every IQM and header check of one case's checked volumes."""
    native = {role: _native(volumes[role]) for role in IMAGE_COLUMNS}
    # Edge alignment needs one grid: T2w's (DWI resampled onto it only when the grids differ).
    t2, _, adc = aligned_channels(volumes, None)
    return _combine(native, t2, adc)


def array_iqms(t2w: np.ndarray, highb: np.ndarray, adc: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The same measures for three (D, H, W) arrays on one grid of ``spacing`` mm (in memory)."""
    sp = np.asarray(spacing, dtype=np.float64)
    native = {"t2w": (t2w, sp), "highb": (highb, sp), "adc": (adc, sp)}
    return _combine(native, t2w, adc)


def case_iqms(case: CaseRecord) -> dict[str, float]:
    """IQMs of one manifest row; raises `CaseError` naming every unusable file (as validate does)."""
    volumes = read_case(case)
    problems = grid_problems(case, volumes)
    if problems:
        raise CaseError(case, problems)
    return volume_iqms(volumes)


# ----------------------------------------------------------------------------- cache


class IqmCache:
    """Per-case IQMs under a cache root, keyed by the three files' contents and IQM_VERSION."""

    def __init__(self, root: Path | str):
        from pfq.data.cache import VolumeCache
        from pfq.data.preprocess import PreprocessConfig

        self.root = Path(root)
        self._hashes = VolumeCache(self.root, PreprocessConfig())  # shares the content-hash records

    def key(self, case: CaseRecord) -> str:
        files = {role: self._hashes.content_hash(case.images[role]) for role in IMAGE_COLUMNS}
        return hashlib.sha256(
            json.dumps({"iqm_version": IQM_VERSION, "files": files}, sort_keys=True).encode()
        ).hexdigest()

    def entry(self, key: str) -> Path:
        return self.root / "iqm" / key[:2] / f"{key}.json"

    def ensure(self, case: CaseRecord) -> dict[str, float]:
        """The case's IQMs, computed and written if needed. Raises `CaseError`."""
        try:
            key = self.key(case)
        except (OSError, KeyError):
            key = None  # a file is missing or unreadable: case_iqms names it
        if key is not None:
            try:
                values = json.loads(self.entry(key).read_text())
                if set(values) == set(iqm_names()) | set(HEADER_NAMES):
                    return {k: float(values[k]) for k in iqm_names() + list(HEADER_NAMES)}
            except (OSError, ValueError, TypeError):
                pass
        values = case_iqms(case)
        if key is None:
            key = self.key(case)
        self.entry(key).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.entry(key), json.dumps(values, sort_keys=True))  # NaN round-trips
        return values


def _measure_one(args: tuple[Path | str, CaseRecord]) -> tuple[dict[str, float] | None, list[Problem]]:
    root, case = args
    if len(case.images) < len(IMAGE_COLUMNS):  # the parser reported the empty paths
        return None, []
    try:
        return IqmCache(root).ensure(case), []
    except CaseError as e:
        return None, e.problems
    except ValueError as e:  # an image too small or degenerate to measure
        return None, [Problem(f"cannot measure image quality: {e}", line=case.line, case_id=case.case_id)]


def manifest_iqms(
    cases: Sequence[CaseRecord], root: Path | str, *, workers: int = 0, progress: bool = True
) -> tuple[list[dict[str, float] | None], list[Problem]]:
    """IQMs per case (None where the case failed) and every problem, naming line, case, column, file.

    ``workers`` > 0 measures in that many processes (spawned: safe beside JAX threads); results keep
    the cases' order either way."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    out: list[dict[str, float] | None] = []
    problems: list[Problem] = []
    jobs = [(root, case) for case in cases]
    bar = tqdm(
        total=len(jobs),
        desc="image-quality metrics",
        unit="case",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    if workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = pool.map(_measure_one, jobs, chunksize=1)
            for values, found in results:
                out.append(values)
                problems += found
                bar.update()
    else:
        for job in jobs:
            values, found = _measure_one(job)
            out.append(values)
            problems += found
            bar.update()
    bar.close()
    return out, problems
