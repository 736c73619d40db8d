"""The `upstream` augmentation preset: upstream ProFound's finetuning transforms, on pfq's volumes.

Upstream's training pipeline (MONAI dictionary transforms, after per-channel z-normalisation over
non-zero voxels and a centre crop to 80 x 300 x 300), in order, with its probabilities:

- `RandRotate` (p 0.3): angles U(-10, 10) degrees in the (H, W), (D, W) and (D, H) planes,
  bilinear, border padding, the output grown to hold the whole rotated volume;
- `RandZoom` (p 0.3): a factor U(0.9, 1.1) per axis, trilinear, edge padding, size kept;
- `SpatialPad`: zeros up to round(1.2 x input size), centred; `RandSpatialCrop`: the input size at
  a uniformly drawn integer position;
- `RandFlip` (p 0.5): along W;
- `RandScaleIntensity` (p 0.8): x (1 + U(-0.1, 0.1)); `RandShiftIntensity` (p 0.8): + U(-0.1, 0.1);
  one factor and one offset for all channels;
- `RandBiasField` (p 0.2): x exp(field), a degree-3 Legendre polynomial with coefficients
  U(0, 0.1), the same field for all channels;
- `RandGaussianSmooth` (p 1): sigma U(0.25, 1.5) voxels per axis, erf-discretised kernel cut at
  4 sigma, zeros outside.

Here they act on the cached, already cropped input (`PreprocessConfig.input_size`), so where
upstream's rotation, zoom and random crop reach into the tissue around its larger crop, these see
the input's replicated edge (rotation, zoom) or zeros (padding) instead (declared in docs/data.md).
Rotation, zoom, padding and crop are one coordinate map, so a voxel is interpolated once (upstream
interpolates twice when both rotation and zoom are drawn). Every draw comes from the generator
passed in; all parameters are drawn whether or not their transform fires, so one draw does not
shift the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

# (probability, range) of each transform, as upstream's get_transforms.
P_ROTATE, MAX_ANGLE = 0.3, np.deg2rad(10.0)
P_ZOOM, ZOOM_RANGE = 0.3, (0.9, 1.1)
PAD_FACTOR = 1.2
P_FLIP = 0.5
P_SCALE, SCALE = 0.8, 0.1
P_SHIFT, SHIFT = 0.8, 0.1
P_BIAS, BIAS_DEGREE, BIAS_COEFF = 0.2, 3, (0.0, 0.1)
P_SMOOTH, SIGMA_RANGE = 1.0, (0.25, 1.5)


@dataclass(frozen=True)
class UpstreamDraw:
    """One volume's random parameters; None where a transform does not fire."""

    angles: tuple[float, float, float] | None  # radians, MONAI's (x, y, z) order
    zoom: tuple[float, float, float] | None  # per (D, H, W) axis
    crop_start: tuple[int, int, int]  # in the padded canvas
    flip: bool
    scale: float | None  # multiply by 1 + scale
    shift: float | None
    bias_coeffs: tuple[float, ...] | None
    sigma: tuple[float, float, float] | None  # voxels per (D, H, W) axis


def rotation_matrix(angles: tuple[float, float, float]) -> np.ndarray:
    """MONAI's 3-D `create_rotate`: Rx(a) @ Ry(b) @ Rz(c) in voxel index space (axes 0, 1, 2)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def rotated_shape(shape: tuple[int, ...], rotation: np.ndarray) -> tuple[int, int, int]:
    """The grown output of MONAI's `Rotate(keep_size=False)`: the extent of the rotated corners."""
    corners = np.array(np.meshgrid(*[(0, n) for n in shape], indexing="ij")).reshape(3, -1)
    return tuple(int(e) for e in np.ptp(rotation @ corners, axis=1) + 0.5)


def canvas_shape(shape: tuple[int, ...], angles) -> tuple[int, int, int]:
    return tuple(shape) if angles is None else rotated_shape(shape, rotation_matrix(angles))


def padded_shape(canvas: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, int, int]:
    """`SpatialPad` to round(1.2 x size); axes already larger stay as they are."""
    return tuple(max(c, int(round(PAD_FACTOR * s))) for c, s in zip(canvas, size, strict=True))


def draw(rng: np.random.Generator, shape: tuple[int, int, int]) -> UpstreamDraw:
    """The parameters of one volume of `shape` (D, H, W); the crop keeps `shape`."""
    fires = rng.random(7) < np.array([P_ROTATE, P_ZOOM, P_FLIP, P_SCALE, P_SHIFT, P_BIAS, P_SMOOTH])
    angles = tuple(float(x) for x in rng.uniform(-MAX_ANGLE, MAX_ANGLE, 3))
    zoom = tuple(float(x) for x in rng.uniform(*ZOOM_RANGE, 3))
    scale, shift = float(rng.uniform(-SCALE, SCALE)), float(rng.uniform(-SHIFT, SHIFT))
    n_coeffs = (BIAS_DEGREE + 1) * (BIAS_DEGREE + 2) * (BIAS_DEGREE + 3) // 6
    coeffs = tuple(float(x) for x in rng.uniform(*BIAS_COEFF, n_coeffs))
    sigma = tuple(float(x) for x in rng.uniform(*SIGMA_RANGE, 3))
    angles = angles if fires[0] else None
    padded = padded_shape(canvas_shape(shape, angles), shape)
    start = tuple(int(rng.integers(0, p - s + 1)) for p, s in zip(padded, shape, strict=True))
    return UpstreamDraw(
        angles=angles,
        zoom=zoom if fires[1] else None,
        crop_start=start,
        flip=bool(fires[2]),
        scale=scale if fires[3] else None,
        shift=shift if fires[4] else None,
        bias_coeffs=coeffs if fires[5] else None,
        sigma=sigma if fires[6] else None,
    )


def geometry(volume: np.ndarray, d: UpstreamDraw) -> np.ndarray:
    """Rotate (border), zoom (edge), zero-pad and crop (D, H, W, C) back to its own shape, one map."""
    shape = volume.shape[:3]
    canvas = canvas_shape(shape, d.angles)
    padded = padded_shape(canvas, shape)
    before = np.array([(p - c) // 2 for p, c in zip(padded, canvas, strict=True)])
    first = np.asarray(d.crop_start) - before  # canvas index of output voxel 0
    if d.angles is None and d.zoom is None:  # an integer shift with zero fill: exact, no interpolation
        out = np.zeros_like(volume)
        src = [slice(max(f, 0), max(min(f + n, c), f, 0)) for f, n, c in zip(first, shape, canvas, strict=True)]
        dst = [slice(s.start - f, s.stop - f) for s, f in zip(src, first, strict=True)]
        out[tuple(dst)] = volume[tuple(src)]
        return out
    grid = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float64) + f for n, f in zip(shape, first, strict=True)], indexing="ij")
    ).reshape(3, -1)  # canvas coordinates of every output voxel
    inside = np.all((grid >= 0) & (grid <= np.asarray(canvas)[:, None] - 1), axis=0)
    centre = (np.asarray(canvas, dtype=np.float64)[:, None] - 1) / 2
    if d.zoom is not None:  # zoom about the canvas centre; edge padding where it zooms out
        grid = np.clip(centre + (grid - centre) / np.asarray(d.zoom)[:, None], 0, np.asarray(canvas)[:, None] - 1)
    if d.angles is not None:  # rotated canvas -> source voxel; border padding is `nearest` below
        grid = rotation_matrix(d.angles) @ (grid - centre) + (np.asarray(shape, dtype=np.float64)[:, None] - 1) / 2
    out = np.empty(volume.shape, np.float32)
    for c in range(volume.shape[-1]):
        values = ndimage.map_coordinates(volume[..., c], grid, order=1, mode="nearest", prefilter=False)
        out[..., c] = np.where(inside, values, 0.0).reshape(shape)
    return out


def bias_field(shape: tuple[int, ...], coeffs: tuple[float, ...], degree: int = BIAS_DEGREE) -> np.ndarray:
    """MONAI's `RandBiasField` field: sum of c_ijk P_i(x) P_j(y) P_k(z) over i + j + k <= degree,
    Legendre polynomials on linspace(-1, 1) per axis, coefficients in MONAI's (i, j, k) loop order."""
    terms = [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]
    matrix = np.zeros((degree + 1,) * 3)
    for (i, j, k), c in zip(terms, coeffs, strict=True):
        matrix[i, j, k] = c
    coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.polynomial.legendre.leggrid3d(*coords, matrix)


def gaussian_kernel(sigma: float, truncated: float = 4.0) -> np.ndarray:
    """MONAI's erf-discretised Gaussian (`gaussian_1d`, approx="erf"): the normal's mass over each unit
    interval, cut at `truncated` sigma, not renormalised."""
    tail = int(max(sigma * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=np.float64)
    t = 0.70710678 / abs(sigma)
    return np.clip(0.5 * (erf(t * (x + 0.5)) - erf(t * (x - 0.5))), 0, None)


def smooth(volume: np.ndarray, sigma: tuple[float, float, float]) -> np.ndarray:
    """Separable Gaussian smoothing of (D, H, W, C) per channel, zeros outside (as MONAI's filter)."""
    out = volume
    for axis, s in enumerate(sigma):
        out = ndimage.correlate1d(out, gaussian_kernel(s).astype(np.float32), axis=axis, mode="constant", cval=0.0)
    return out


def apply(volume: np.ndarray, d: UpstreamDraw) -> np.ndarray:
    """Upstream's training transforms with the parameters `d`, on (D, H, W, C) float32."""
    out = geometry(np.asarray(volume, np.float32), d)
    if d.flip:
        out = out[:, :, ::-1]
    if d.scale is not None:
        out = out * np.float32(1.0 + d.scale)
    if d.shift is not None:
        out = out + np.float32(d.shift)
    if d.bias_coeffs is not None:
        out = out * np.exp(bias_field(out.shape[:3], d.bias_coeffs)).astype(np.float32)[..., None]
    if d.sigma is not None:
        out = smooth(np.ascontiguousarray(out, dtype=np.float32), d.sigma)
    return np.ascontiguousarray(out, dtype=np.float32)


def augment_upstream(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw and apply upstream's training augmentation to one (D, H, W, C) volume."""
    return apply(volume, draw(rng, tuple(volume.shape[:3])))
