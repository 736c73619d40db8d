"""MRI quality degradation driven by one severity knob ``s`` (0 = a good scan, 1 = severe).

Each artefact below can also get its own severity (``Severity``: motion, ghost, blur, bias, noise,
distortion); a plain number sets all six to it, which is what the phantom sets use. The random draws do
not depend on the severities, so changing one artefact's severity leaves the others' realisations as
they were (the basis of the single-artefact validation of the image-quality metrics).

Every artefact is pure numpy and deterministic given a ``numpy.random.Generator``. Arrays are
(D, H, W) = (slice, phase-encode, read-out) with the phase-encode direction anterior-posterior (H),
as for axial prostate T2w and EPI DWI. Amplitudes (also in ``docs/phantoms.md``):

- motion: k-space splicing of 2-4 rigidly moved copies (in-plane rotation <= 4s deg, shift <= 3s mm);
- ghosting: every n-th phase-encode plane (n = 4-8) scaled by 1 - 0.7s (EPI Nyquist ghost: n = 2,
  1 - 0.35s), the k-space centre kept;
- blur: in-plane Gaussian sigma = 0.25 + 0.8s mm (EPI: 0.5 + 1.0s), plus thick-slice box averaging
  (slices (1-2)s mm thicker than the grid: 3-4 mm at s = 1 on a 2 mm grid);
- bias field: exp of a degree-3 Legendre polynomial, coefficients U(-0.3s, 0.3s);
- Rician noise: sigma = (sigma0 + 0.12s) * reference tissue level (DWI: of the b=50 level, so the
  b=1400 PZ signal is at SNR ~1 for s >= 0.5), magnitude sqrt((x + n1)^2 + n2^2);
- DWI distortion: a smooth anterior-posterior shift of up to 2-6s mm, strongest where ``focus`` is 1
  (the rectal wall), applied to every b-value before ADC is computed, so ADC is misregistered vs T2w.

The k-space steps use real FFTs (``scipy.fft.rfftn``): splicing and ghosting then act on
Hermitian-symmetric spectra, so the image is the real part rather than the magnitude of a complex
reconstruction. It is several times cheaper and looks the same at these amplitudes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import fft as sfft  # pocketfft with native float32: ~5x faster than numpy.fft here

Spacing = tuple[float, float, float]
Shape = tuple[int, int, int]

SEVERITY_RANGES = {"hq": (0.0, 0.15), "lq": (0.5, 1.0)}
# Noise sigma = (sigma0 + slope * s) * tissue signal (the gland mean; for DWI at b=50).
T2W_SIGMA0, T2W_NOISE_SLOPE = 0.02, 0.12
DWI_SIGMA0, DWI_NOISE_SLOPE = 0.015, 0.12


ARTEFACTS = ("motion", "ghost", "blur", "bias", "noise", "distortion")


@dataclass(frozen=True)
class Severity:
    """Per-artefact severities in [0, 1]; ``distortion`` (EPI shift and signal loss) acts on DWI only."""

    motion: float = 0.0  # k-space splicing of moved poses; DWI: drift between b-values
    ghost: float = 0.0  # periodic phase-encode line errors (EPI: Nyquist ghost)
    blur: float = 0.0  # in-plane Gaussian PSF and thick slices
    bias: float = 0.0  # coil-sensitivity field
    noise: float = 0.0  # Rician noise above the scanner floor
    distortion: float = 0.0  # DWI susceptibility shift and signal loss

    @classmethod
    def uniform(cls, s: float) -> Severity:
        return cls(*([float(s)] * len(ARTEFACTS)))

    @property
    def overall(self) -> float:
        """The worst artefact: the single knob's value when all are equal."""
        return max(self.as_dict().values())

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def as_severity(s: float | Severity | Mapping[str, float]) -> Severity:
    """A ``Severity`` from a number (every artefact at it), a mapping (missing artefacts 0) or itself."""
    if isinstance(s, Severity):
        return s
    if isinstance(s, Mapping):
        unknown = set(s) - {f.name for f in fields(Severity)}
        if unknown:
            raise ValueError(f"unknown artefact(s) {sorted(unknown)}; choose from {list(ARTEFACTS)}")
        return Severity(**{k: float(v) for k, v in s.items()})
    return Severity.uniform(float(s))


def sample_severity(quality: str, rng: np.random.Generator) -> float:
    """Draw a severity for a quality grade: HQ ~ U(0, 0.15), LQ ~ U(0.5, 1)."""
    lo, hi = SEVERITY_RANGES[check_quality(quality)]
    return float(rng.uniform(lo, hi))


def check_quality(quality: str) -> str:
    if quality not in SEVERITY_RANGES:
        raise ValueError(f"quality must be 'hq' or 'lq', got {quality!r}")
    return quality


# ----------------------------------------------------------------------------- k-space helpers


def rfft_freqs(shape: Shape, spacing: Spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequencies (cycles/mm) of an rfftn grid, broadcastable to its (D, H, W//2+1) shape."""
    fz = np.fft.fftfreq(shape[0], d=spacing[0]).astype(np.float32)[:, None, None]
    fy = np.fft.fftfreq(shape[1], d=spacing[1]).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(shape[2], d=spacing[2]).astype(np.float32)[None, None, :]
    return fz, fy, fx


def resolution_transfer(shape: Shape, spacing: Spacing, sigma_mm: float, extra_slice_mm: float) -> np.ndarray:
    """Transfer function of an in-plane Gaussian PSF and a box slice profile widened by ``extra_slice_mm``.

    The clean grid is point-sampled, so sigma 0 and no extra width give the identity.
    """
    fz, fy, fx = rfft_freqs(shape, spacing)
    gauss = np.exp(-2.0 * np.pi**2 * sigma_mm**2 * (fy**2 + fx**2))
    slab = np.sinc(extra_slice_mm * fz).astype(np.float32)
    return (gauss * slab).astype(np.float32)


def _phase_ramp(shape: Shape, spacing: Spacing, shift_mm: Sequence[float]) -> np.ndarray:
    """Fourier factor that translates an image by ``shift_mm`` (D, H, W) with sub-voxel accuracy."""
    fz, fy, fx = rfft_freqs(shape, spacing)
    # Separable: three small vectors and one broadcast product instead of a full-volume exp.
    pairs = zip((fz, fy, fx), shift_mm, strict=True)
    rz, ry, rx = (np.exp(-2j * np.pi * f * d).astype(np.complex64) for f, d in pairs)
    return rz * ry * rx


def _centred_ky(n: int) -> np.ndarray:
    """Signed phase-encode index of every H line in FFT order (0 = k-space centre)."""
    return np.fft.fftfreq(n, d=1.0 / n).astype(np.int64)


def ghost_line_gain(n_lines: int, period: int, offset: int, strength: float) -> np.ndarray:
    """Per-line k-space gain: every ``period``-th line scaled by 1 - strength, the centre kept.

    Keeping the central lines preserves overall contrast, so only ghosts appear.
    """
    ky = _centred_ky(n_lines)
    gain = np.ones(n_lines, dtype=np.float32)
    hit = ((ky - offset) % period == 0) & (np.abs(ky) > 2)
    gain[hit] = 1.0 - strength
    return gain


def rotate_inplane(vol: np.ndarray, angle_deg: float, spacing: Spacing) -> np.ndarray:
    """Rotate every slice about the (H, W) centre by bilinear interpolation, edges clamped.

    Works in millimetres so that anisotropic pixels rotate as the patient does.
    """
    _, h, w = vol.shape
    a = np.deg2rad(angle_deg)
    y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * spacing[1]
    x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * spacing[2]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    src_y = (np.cos(a) * yy + np.sin(a) * xx) / spacing[1] + (h - 1) / 2
    src_x = (-np.sin(a) * yy + np.cos(a) * xx) / spacing[2] + (w - 1) / 2
    src_y = np.clip(src_y, 0, h - 1)
    src_x = np.clip(src_x, 0, w - 1)
    y0 = np.minimum(np.floor(src_y).astype(np.int64), h - 2)
    x0 = np.minimum(np.floor(src_x).astype(np.int64), w - 2)
    wy = (src_y - y0).astype(np.float32)
    wx = (src_x - x0).astype(np.float32)
    top = vol[:, y0, x0] * (1 - wx) + vol[:, y0, x0 + 1] * wx
    bot = vol[:, y0 + 1, x0] * (1 - wx) + vol[:, y0 + 1, x0 + 1] * wx
    return (top * (1 - wy) + bot * wy).astype(np.float32)


def splice_motion(
    vol: np.ndarray, spacing: Spacing, s: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Spectrum (rfftn) of ``vol`` acquired while the patient moved between 2-4 rigid poses.

    Phase-encode lines are acquired in linear order and split into contiguous segments, one per pose.
    The pose that holds the k-space centre is the reference (unmoved), so anatomy stays registered
    with the labels and motion shows as ghosting/blurring along H. Returns (spectrum, line owner).
    """
    h = vol.shape[1]
    n_poses = min(int(rng.integers(2, 5)), h)
    cuts = np.sort(rng.choice(np.arange(1, h), size=n_poses - 1, replace=False))
    owner_linear = np.searchsorted(cuts, np.arange(h), side="right")  # line index in -ky..+ky order
    ky = _centred_ky(h)
    owner = owner_linear[ky + h // 2]  # owner per line in FFT order
    ref = owner[0]
    spec = sfft.rfftn(vol)
    for pose in range(n_poses):
        angle = rng.uniform(-4.0, 4.0) * s
        shift = rng.uniform(-3.0, 3.0, size=3) * s
        if pose == ref or s == 0.0:
            continue
        lines = owner == pose
        moved = rotate_inplane(vol, angle, spacing) if abs(angle) > 1e-3 else vol
        moved_spec = sfft.rfftn(moved) * _phase_ramp(vol.shape, spacing, shift)
        spec[:, lines, :] = moved_spec[:, lines, :]
    return spec, owner


# ----------------------------------------------------------------------------- image-domain artefacts


def legendre_bias_field(shape: Shape, s: float, rng: np.random.Generator, order: int = 3) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field exp(sum c_lmn P_l(z) P_m(y) P_n(x)), l+m+n <= order."""
    polys = [np.polynomial.legendre.legvander(np.linspace(-1, 1, n), order).astype(np.float32) for n in shape]
    idx = np.arange(order + 1)
    keep = (idx[:, None, None] + idx[None, :, None] + idx[None, None, :]) <= order
    keep[0, 0, 0] = False  # no global gain: per-case gain is drawn elsewhere
    coef = rng.uniform(-0.3 * s, 0.3 * s, size=keep.shape).astype(np.float32) * keep
    log_field = np.einsum("lmn,zl,ym,xn->zyx", coef, *polys, optimize=True)
    return np.exp(log_field).astype(np.float32)


def rician_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise: sqrt((x + n1)^2 + n2^2)."""
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)


def noise_sigma(s: float, reference: float, sigma0: float, slope: float) -> float:
    """Noise level: a scanner floor plus a severity-driven part, both relative to the tissue signal."""
    return float((sigma0 + slope * s) * reference)


def _reference_level(img: np.ndarray, reference: float | None) -> float:
    """Signal level the noise is relative to; default: mean of the brighter half of the voxels."""
    if reference is not None:
        return float(reference)
    return float(np.mean(img[img >= np.median(img)]))


# ----------------------------------------------------------------------------- DWI geometry


def ap_shift_field(shape: Shape, s: float, rng: np.random.Generator, focus: np.ndarray | None = None) -> np.ndarray:
    """Anterior-posterior (H) displacement in mm: peak 2-6s mm, concentrated where ``focus`` ~ 1.

    Susceptibility at the rectal gas/wall interface is the dominant source in prostate EPI, so the
    phantom passes a focus map around the rectal wall; a weak global smooth component is always there.
    """
    peak = rng.uniform(2.0, 6.0) * s
    smooth = legendre_bias_field(shape, 1.0, rng, order=2)
    smooth = np.log(smooth)  # zero-mean-ish smooth polynomial in about [-1, 1]
    smooth /= max(float(np.abs(smooth).max()), 1e-6)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    weight = np.float32(1.0) if focus is None else focus.astype(np.float32)
    field = sign * peak * (0.3 * smooth + 0.7 * weight * (0.75 + 0.25 * smooth))
    return field.astype(np.float32)


@dataclass(frozen=True)
class _ShiftPlan:
    """Gather indices and weights of an H-axis resampling, reusable across images of one field."""

    lo: np.ndarray  # flat indices of the lower neighbour
    hi: np.ndarray
    weight: np.ndarray  # weight of the upper neighbour
    jacobian: np.ndarray | None


def _shift_plan(shift_vox: np.ndarray, pile_up: bool) -> _ShiftPlan:
    d, h, w = shift_vox.shape
    src = np.clip(np.arange(h, dtype=np.float32)[None, :, None] - shift_vox, 0, h - 1)
    j0 = np.minimum(np.floor(src).astype(np.int64), h - 2)
    base = (np.arange(d)[:, None, None] * h) * w + np.arange(w)[None, None, :]
    lo = base + j0 * w
    jac = np.clip(1.0 - np.gradient(shift_vox, axis=1), 0.5, 2.0).astype(np.float32) if pile_up else None
    return _ShiftPlan(lo, lo + w, (src - j0).astype(np.float32), jac)


def _apply_plan(vol: np.ndarray, plan: _ShiftPlan) -> np.ndarray:
    flat = vol.reshape(*vol.shape[:-3], -1)  # leading axes: several volumes, one plan
    out = flat[..., plan.lo] * (1 - plan.weight) + flat[..., plan.hi] * plan.weight
    if plan.jacobian is not None:
        out *= plan.jacobian
    return out.astype(np.float32)


def apply_ap_shift(vol: np.ndarray, shift_vox: np.ndarray, *, pile_up: bool = True) -> np.ndarray:
    """Resample (..., D, H, W) volumes along H: out(j) = in(j - u(j)), linear, edges clamped.

    With ``pile_up`` the intensity is scaled by the Jacobian |1 - du/dj| (signal piles up where the
    distortion compresses tissue, thins out where it stretches it), as in real EPI.
    """
    return _apply_plan(vol, _shift_plan(shift_vox, pile_up))


def susceptibility_loss(focus: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative DWI signal loss near a susceptibility interface: up to (0.72-1.2)s, capped at 95%."""
    loss = min(rng.uniform(0.6, 1.0) * 1.2 * s, 0.95)
    return (1.0 - loss * np.clip(focus, 0.0, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- full acquisitions


def _kspace_degrade(spec: np.ndarray, shape: Shape, line_gain: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    """Apply ghosting line gains and the resolution transfer, back to the image (real part, abs)."""
    spec = spec * line_gain[None, :, None] * transfer
    return np.abs(sfft.irfftn(spec, s=shape, axes=(0, 1, 2))).astype(np.float32)


def degrade_t2w(
    img: np.ndarray,
    s: float | Severity,
    rng: np.random.Generator,
    spacing: Spacing,
    *,
    reference: float | None = None,
    sigma0: float = T2W_SIGMA0,
    noise_slope: float = T2W_NOISE_SLOPE,
) -> np.ndarray:
    """A turbo-spin-echo style acquisition of ``img``: motion, ghosting, blur, bias field, Rician noise.

    ``s``: one severity for every artefact, or a ``Severity`` per artefact (``distortion`` unused)."""
    sev = as_severity(s)
    shape = tuple(img.shape)
    ref = _reference_level(img, reference)
    spec, _ = splice_motion(img.astype(np.float32), spacing, sev.motion, rng)
    gain = ghost_line_gain(shape[1], int(rng.integers(4, 9)), int(rng.integers(0, 4)), 0.7 * sev.ghost)
    sigma_mm = 0.25 + 0.8 * sev.blur
    transfer = resolution_transfer(shape, spacing, sigma_mm, sev.blur * rng.uniform(1.0, 2.0))
    out = _kspace_degrade(spec, shape, gain, transfer)
    out *= legendre_bias_field(shape, sev.bias, rng)
    return rician_noise(out, noise_sigma(sev.noise, ref, sigma0, noise_slope), rng)


@dataclass
class DwiAcquisition:
    images: list[np.ndarray]  # degraded b-value images, Rician noise included
    noiseless: list[np.ndarray]  # the same before noise: what an observer's eye averages towards
    shift_mm: np.ndarray  # anterior-posterior EPI displacement (mm) applied to every image
    sigma: list[float]  # noise level of each image


def degrade_dwi(
    images: Sequence[np.ndarray],
    s: float | Severity,
    rng: np.random.Generator,
    spacing: Spacing,
    *,
    focus: np.ndarray | None = None,
    reference: float | None = None,
    averages: Sequence[float] | None = None,
    sigma0: float = DWI_SIGMA0,
    noise_slope: float = DWI_NOISE_SLOPE,
) -> DwiAcquisition:
    """An EPI acquisition of several b-value images of one object.

    All b-values share the distortion field, the susceptibility signal loss and the coil bias (both
    cancel in noise-free ADC), the blur and the Nyquist-ghost pattern. Each later b-value drifts a
    little (patient motion between b-values, <= 1.5s mm) and every image gets its own noise, relative
    to ``reference`` (the low-b tissue signal; default: from the first image) and divided by
    sqrt(``averages``) (protocols may average high b-values more; default 1 each). ``s``: one
    severity for every artefact, or a ``Severity`` per artefact.
    """
    sev = as_severity(s)
    shape = tuple(images[0].shape)
    ref = _reference_level(images[0], reference)
    shift_mm = ap_shift_field(shape, sev.distortion, rng, focus)
    plan = _shift_plan(shift_mm / np.float32(spacing[1]), pile_up=True)
    bias = legendre_bias_field(shape, sev.bias, rng)
    if focus is not None:
        bias = bias * susceptibility_loss(focus, sev.distortion, rng)
    gain = ghost_line_gain(shape[1], 2, int(rng.integers(0, 2)), 0.35 * sev.ghost)
    transfer = resolution_transfer(shape, spacing, 0.5 + 0.8 * sev.blur, sev.blur * rng.uniform(1.0, 2.0))
    sigma = noise_sigma(sev.noise, ref, sigma0, noise_slope)
    averages = [1.0] * len(images) if averages is None else list(averages)
    result = DwiAcquisition([], [], shift_mm, [])
    for idx, img in enumerate(images):
        spec = sfft.rfftn(_apply_plan(img.astype(np.float32), plan))
        drift = rng.uniform(-1.5, 1.5, size=3) * sev.motion
        if idx > 0 and sev.motion > 0:
            spec = spec * _phase_ramp(shape, spacing, drift)
        degraded = _kspace_degrade(spec, shape, gain, transfer) * bias
        result.noiseless.append(degraded)
        result.sigma.append(sigma / float(np.sqrt(averages[idx])))
        result.images.append(rician_noise(degraded, result.sigma[-1], rng))
    return result


def compute_adc(low: np.ndarray, high: np.ndarray, b_low: float, b_high: float) -> np.ndarray:
    """ADC in 1e-6 mm^2/s from two b-value images, clipped to [0, 3000] as scanners do."""
    eps = np.float32(1e-6)
    ratio = np.log(np.maximum(low, eps) / np.maximum(high, eps))
    adc = ratio / np.float32((b_high - b_low) * 1e-6)
    return np.clip(adc, 0.0, 3000.0).astype(np.float32)
