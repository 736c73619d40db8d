"""NIfTI volumes -> model input: (D, H, W, 3) float32, channels [T2w, high-b, ADC].

Steps for one case, in order:
1. Read each file (regular files only, its header checked before the data: `pfq.data.nifti`),
   apply its scaling (scl_slope/inter) and cast to float32; reject files that are missing, not
   NIfTI, not 3-D, non-finite, all zero, or with absurd voxel spacing.
2. Output grid: T2w's grid reoriented to the closest canonical orientation (RAS+), optionally
   resampled to a target spacing (`PreprocessConfig.spacing`, (D, H, W) mm).
3. Each channel onto that grid: a channel on T2w's grid is only flipped/permuted (exact); one on
   another grid (shape or affine) is resampled through the two affines (trilinear, zero outside its
   field of view). Folding both into one affine map interpolates each voxel at most once. A target
   spacing that T2w already has (to within header float noise) resamples nothing. Exact zeros are
   background, not signal: interpolation averages the non-zero neighbours only and an output voxel
   stays zero unless they carry at least half of its weight, so resampling neither smears the
   background into the tissue nor adds a rim of near-zero voxels to the normalisation below.
4. File voxel axes (i, j, k) -> (D, H, W) = (k, j, i), like upstream.
5. Per-channel z-normalisation over non-zero voxels, then centre crop / zero pad to the input size
   (MONAI's centre: a crop starts at n//2 - size//2).

Upstream ProFound does not reorient or resample; with `spacing=None` and data already on one RAS
grid, steps 2-3 are the identity and the result matches upstream's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from scipy import ndimage

from pfq.data.manifest import IMAGE_COLUMNS, CaseRecord, Problem
from pfq.data.nifti import NiftiError, load_image
from pfq.safe_open import UnsafeFileError

# Bump when the preprocessing output changes for the same inputs and config: it keys the cache.
PREPROCESS_VERSION = 3
SPACING_RANGE_MM = (0.05, 20.0)  # per voxel axis; outside this the header is wrong, not the anatomy
GRID_ATOL = 1e-3  # affines closer than this (mm) are the same grid; scanners write float noise


class VolumeError(ValueError):
    """An image that cannot be used, naming its file."""

    def __init__(self, file: Path | str, reason: str):
        self.file, self.reason = Path(file), reason
        super().__init__(f"{file}: {reason}")


class CaseError(ValueError):
    """A case that cannot be preprocessed; `problems` names every bad file and column."""

    def __init__(self, case: CaseRecord, problems: Sequence[Problem]):
        self.case, self.problems = case, list(problems)
        super().__init__(f"case {case.case_id!r} (line {case.line}): " + "; ".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: tuple[int, int, int] = (64, 224, 224)  # (D, H, W) after crop / pad
    spacing: tuple[float, float, float] | None = None  # (D, H, W) mm; None keeps T2w's voxel grid

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be three positive ints (D, H, W), got {self.input_size}")
        if self.spacing is not None and (
            len(self.spacing) != 3
            or not all(SPACING_RANGE_MM[0] <= float(s) <= SPACING_RANGE_MM[1] for s in self.spacing)
        ):
            raise ValueError(
                f"spacing must be three values in {list(SPACING_RANGE_MM)} mm (D, H, W), got {self.spacing}"
            )

    @classmethod
    def from_config(cls, data) -> PreprocessConfig:
        """From a run config's `data` section (`spacing` empty or None: no resampling)."""
        spacing = data.spacing or None
        return cls(
            input_size=tuple(int(n) for n in data.input_size),
            spacing=tuple(float(s) for s in spacing) if spacing else None,
        )

    def key(self) -> dict:
        return {
            "version": PREPROCESS_VERSION,
            "input_size": [int(n) for n in self.input_size],
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
        }


@dataclass
class Volume:
    path: Path
    data: np.ndarray  # float32, in the file's voxel order (i, j, k)
    affine: np.ndarray  # voxel (i, j, k) -> world mm; from pixdim alone when not `oriented`
    oriented: bool  # the header has a usable affine (qform or sform code > 0, finite, invertible)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _header_affine(image, raw) -> tuple[np.ndarray, bool]:
    header = image.header
    codes = int(header.get_sform(coded=True)[1]), int(header.get_qform(coded=True)[1])
    affine = np.asarray(image.affine, dtype=np.float64)
    if max(codes) > 0 and np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12:
        return affine, True
    # No usable orientation: keep the stored axes, take spacing from pixdim as written (nibabel's
    # loader silently turns a zero pixdim into 1 mm, which would hide a broken header).
    zooms = [float(z) for z in raw["pixdim"][1:4]]
    return np.diag(zooms + [1.0]), False


def read_volume(path: Path | str) -> Volume:
    """One NIfTI file, checked. Raises `VolumeError` naming the file and what is wrong."""
    path = Path(path)
    try:  # regular files only, header checked before any voxel data is read (`pfq.data.nifti`)
        image, raw_header = load_image(path)
    except (UnsafeFileError, NiftiError) as e:
        raise VolumeError(path, e.reason) from None
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1) is a 3-D volume
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(path, f"expected a 3-D volume, got a {len(shape)}-D image of shape {tuple(image.shape)}")
    affine, oriented = _header_affine(image, raw_header)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if not (np.isfinite(spacing).all() and low <= spacing.min() and spacing.max() <= high):
        raise VolumeError(
            path, f"absurd voxel spacing {np.round(spacing, 6).tolist()} mm (each axis must be in [{low}, {high}] mm)"
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as e:
        raise VolumeError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(path, f"{bad} NaN/Inf voxel(s) after scaling")
    if not data.any():
        raise VolumeError(path, "all voxels are zero (empty volume)")
    return Volume(path, data, affine, oriented)


def read_case(case: CaseRecord) -> dict[str, Volume]:
    """The three volumes of a case; raises `CaseError` naming every unusable file."""
    volumes, problems = {}, []
    for role in IMAGE_COLUMNS:
        column = case.columns.get(role, role)
        if role not in case.images:
            problems.append(Problem("no image path", line=case.line, case_id=case.case_id, column=column))
            continue
        try:
            volumes[role] = read_volume(case.images[role])
        except VolumeError as e:
            problems.append(Problem(e.reason, line=case.line, case_id=case.case_id, column=column, file=str(e.file)))
    if problems:
        raise CaseError(case, problems)
    return volumes


def _same_grid(a: Volume, b: Volume) -> bool:
    """Same voxel grid. Equal shapes count as the same grid when either header lacks an orientation
    (tools that drop headers still write arrays on the source grid)."""
    if a.shape != b.shape:
        return False
    return not (a.oriented and b.oriented) or bool(np.allclose(a.affine, b.affine, atol=GRID_ATOL))


def _corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates of a grid's field-of-view corners (voxel edges), (4, 8)."""
    grid = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones(8)])


def grid_problems(case: CaseRecord, volumes: dict[str, Volume]) -> list[Problem]:
    """High-b and ADC must lie on T2w's grid or be resamplable onto it (both oriented, overlapping)."""
    ref, problems = volumes["t2w"], []
    for role in IMAGE_COLUMNS[1:]:
        vol = volumes[role]
        if _same_grid(vol, ref):
            continue
        where = dict(line=case.line, case_id=case.case_id, column=case.columns.get(role, role), file=str(vol.path))
        if not (vol.oriented and ref.oriented):
            which = " and ".join(n for n, v in ((role, vol), ("t2w", ref)) if not v.oriented)
            problems.append(
                Problem(
                    f"grid {vol.shape} differs from T2w's {ref.shape} and {which} has no usable "
                    "affine (qform/sform codes 0, or non-finite/singular), so it cannot be resampled",
                    **where,
                )
            )
            continue
        inside = (np.linalg.inv(vol.affine) @ ref.affine @ _corners(ref.shape))[:3]
        lo, hi = inside.min(axis=1), inside.max(axis=1)
        if np.any(hi < -0.5) or np.any(lo > np.asarray(vol.shape) - 0.5):
            problems.append(
                Problem(
                    f"field of view does not overlap T2w's ({ref.path.name}); the affines place "
                    "them in different places",
                    **where,
                )
            )
    return problems


def output_grid(ref: Volume, spacing_dhw: Sequence[float] | None) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """(shape (i, j, k), affine, orientation) of the output grid: T2w's grid in closest-canonical
    orientation, resampled to `spacing_dhw` if given, with the field of view's edges kept."""
    ornt = io_orientation(ref.affine) if ref.oriented else np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    affine = ref.affine @ inv_ornt_aff(ornt, ref.shape)
    shape = [0, 0, 0]
    for axis, (out_axis, _) in enumerate(ornt):  # input axis `axis` becomes output axis `out_axis`
        shape[int(out_axis)] = int(ref.shape[axis])
    shape = tuple(shape)
    if spacing_dhw is None:
        return shape, affine, ornt
    current, target = np.linalg.norm(affine[:3, :3], axis=0), np.asarray(spacing_dhw, dtype=np.float64)[::-1]
    if np.all(np.abs(target - current) * np.asarray(shape) <= GRID_ATOL):
        return shape, affine, ornt  # already at that spacing (headers store it as float32): no resampling
    factor = target / current
    shape = tuple(max(1, int(np.floor(n / f + 0.5))) for n, f in zip(shape, factor, strict=True))
    step = np.eye(4)
    step[:3, :3] = np.diag(factor)
    step[:3, 3] = (factor - 1.0) / 2.0  # output voxel o covers input voxels [o*f - 1/2, (o+1)*f - 1/2]
    return shape, affine @ step, ornt


def _is_diagonal(matrix: np.ndarray) -> bool:
    return bool(np.all(np.abs(matrix - np.diag(np.diag(matrix))) < 1e-9))


def resample_separable(data: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling for an axis-aligned map (source index = scale * output index + offset),
    one axis at a time, about ten times faster than `ndimage.affine_transform`. Edges: the source is
    extended by one replicated voxel (so the half voxel at each border of its field of view keeps
    the edge value), zero beyond: exactly `_resample_general`'s result."""
    out = data
    # Shrinking axes first keeps the intermediate arrays small.
    for axis in sorted(range(3), key=lambda a: shape[a] / data.shape[a]):
        n = out.shape[axis]
        coords = np.arange(shape[axis]) * scale[axis] + offset[axis]
        low = np.floor(coords).astype(np.int64)
        frac = (coords - low).astype(np.float32)
        inside = ((coords >= -1) & (coords <= n)).astype(np.float32)
        bshape = [1, 1, 1]
        bshape[axis] = -1
        a = np.take(out, np.clip(low, 0, n - 1), axis=axis)
        a *= ((1 - frac) * inside).reshape(bshape)
        b = np.take(out, np.clip(low + 1, 0, n - 1), axis=axis)
        b *= (frac * inside).reshape(bshape)
        a += b
        out = a
    return out


def _resample_general(data: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling for any affine map, with `resample_separable`'s edge rule."""
    padded = np.pad(data, 1, mode="edge")
    return ndimage.affine_transform(
        padded,
        matrix,
        offset=np.asarray(offset) + 1.0,
        output_shape=tuple(shape),
        order=1,
        mode="constant",
        cval=0.0,
        prefilter=False,
        output=np.float32,
    )


def _onto(volume: Volume, source_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Trilinear resampling of `volume` onto the grid (`shape`, `affine`); zero outside its field of view.

    Exact zeros (background) are carried as a mask: an output voxel is the weighted mean of its
    non-zero source neighbours where those hold at least half of the interpolation weight, else zero."""
    m = np.linalg.inv(source_affine) @ affine  # output voxel -> source voxel
    if _is_diagonal(m[:3, :3]):  # axis-aligned grids (the usual case): separable and fast

        def resample(x):
            return resample_separable(x, np.diag(m[:3, :3]), m[:3, 3], shape)
    else:

        def resample(x):
            return _resample_general(x, m[:3, :3], m[:3, 3], shape)

    out = resample(volume.data)
    if volume.data.all():  # no background inside the field of view
        return out
    weight = resample((volume.data != 0).astype(np.float32))
    keep = weight >= 0.5
    return np.divide(out, weight, out=np.zeros_like(out), where=keep)


def nonzero_stats(volume: np.ndarray) -> tuple[float, float] | None:
    """Mean and standard deviation over the non-zero voxels (None if there are none)."""
    n = int(np.count_nonzero(volume))
    if n == 0:
        return None
    mean = float(volume.sum(dtype=np.float64)) / n  # zeros add nothing, so no masked copy is needed
    flat = volume.reshape(-1)  # a view for the contiguous arrays preprocessing produces
    var = max(float(np.einsum("i,i->", flat, flat, dtype=np.float64)) / n - mean * mean, 0.0)
    return mean, (float(np.sqrt(var)) if var > 0 else 1.0)


def znormalise(volume: np.ndarray, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Zero mean, unit variance over the non-zero voxels (or with the given stats); zeros
    (background/padding) stay zero."""
    stats = nonzero_stats(volume) if stats is None else stats
    if stats is None:
        return volume.astype(np.float32)
    mean, std = stats
    out = (volume.astype(np.float32) - np.float32(mean)) / np.float32(std)
    out[volume == 0] = 0
    return out


def crop_or_pad(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre crop where larger, zero-pad (centred) where smaller, per leading axis. As MONAI's
    `CenterSpatialCrop` / `SpatialPad` (upstream's): a crop starts at n//2 - size//2 (one voxel later
    than (n - size)//2 when n is even and size odd); padding puts (size - n)//2 zeros before."""
    size = tuple(int(n) for n in size)
    out = np.zeros(size + volume.shape[len(size) :], dtype=volume.dtype)
    src, dst = [], []
    for n, target in zip(volume.shape, size, strict=False):
        if n >= target:
            start = n // 2 - target // 2
            src.append(slice(start, start + target))
            dst.append(slice(0, target))
        else:
            before = (target - n) // 2
            src.append(slice(0, n))
            dst.append(slice(before, before + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _aligned_ijk(volumes: dict[str, Volume], spacing_dhw: Sequence[float] | None) -> list[np.ndarray]:
    ref = volumes["t2w"]
    shape, affine, ornt = output_grid(ref, spacing_dhw)
    native_shape, native_affine, _ = output_grid(ref, None)
    resampled = shape != native_shape or not np.array_equal(affine, native_affine)
    channels = []
    for role in IMAGE_COLUMNS:
        vol = volumes[role]
        same = _same_grid(vol, ref)
        if same and not resampled:
            channels.append(apply_orientation(vol.data, ornt))  # flips/permutations only: exact
        else:
            channels.append(_onto(vol, ref.affine if same else vol.affine, shape, affine))
    return channels


def aligned_channels(volumes: dict[str, Volume], spacing_dhw: Sequence[float] | None) -> list[np.ndarray]:
    """Each channel on the output grid in (D, H, W) order, before normalisation (steps 2-4)."""
    return [np.ascontiguousarray(c.transpose(2, 1, 0), dtype=np.float32) for c in _aligned_ijk(volumes, spacing_dhw)]


def preprocess_volumes(volumes: dict[str, Volume], config: PreprocessConfig) -> np.ndarray:
    """(D, H, W, 3) float32 model input from a case's checked volumes (see the module docstring).

    Statistics come from the whole volume, but only the cropped window is normalised and transposed:
    the same result as normalising first, with less work."""
    out = np.empty(tuple(config.input_size) + (len(IMAGE_COLUMNS),), np.float32)
    for c, data in enumerate(_aligned_ijk(volumes, config.spacing)):
        window = crop_or_pad(data, tuple(config.input_size)[::-1])  # axes are independent: crop in (i, j, k)
        out[..., c] = znormalise(window, nonzero_stats(data)).transpose(2, 1, 0)
    return out


def load_case(case: CaseRecord, config: PreprocessConfig) -> np.ndarray:
    """Preprocessed (D, H, W, 3) float32 input for one manifest row; raises `CaseError`."""
    volumes = read_case(case)
    problems = grid_problems(case, volumes)
    if problems:
        raise CaseError(case, problems)
    return preprocess_volumes(volumes, config)


def load_nifti(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One checked volume as a (D, H, W) array in closest-canonical orientation, and its affine."""
    vol = read_volume(path)
    shape, affine, ornt = output_grid(vol, None)
    return np.ascontiguousarray(apply_orientation(vol.data, ornt).transpose(2, 1, 0)), affine
