"""NIfTI volumes -> model input: (D, H, W, 3) float32, channels [T2w, high-b, ADC].

Steps, in order: reorient to the closest canonical (RAS) orientation; apply the NIfTI scaling
(scl_slope/inter) and cast to float32; take file voxel axes (i, j, k) as (D, H, W) = (k, j, i) like
upstream; z-normalise each channel over its non-zero voxels; centre-crop / zero-pad to the input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pfq.data.manifest import IMAGE_COLUMNS, CaseRecord


class VolumeError(ValueError):
    """An image that cannot be used, naming its file."""


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: tuple[int, int, int] = (64, 224, 224)  # (D, H, W) after crop / pad

    def key(self) -> dict:
        return {"input_size": list(self.input_size)}


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array in (D, H, W) order and the canonical affine. Raises `VolumeError` naming the file."""
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for corrupt input
        raise VolumeError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine


def znormalise(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the non-zero voxels; zeros (background/padding) stay zero."""
    mask = volume != 0
    if not mask.any():
        return volume.astype(np.float32)
    values = volume[mask]
    std = float(values.std())
    out = np.zeros_like(volume, dtype=np.float32)
    out[mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def crop_or_pad(volume: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Centre crop where larger, zero-pad (centred) where smaller, per axis."""
    out = volume
    for axis, target in enumerate(size):
        n = out.shape[axis]
        if n > target:
            start = (n - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
        elif n < target:
            before = (target - n) // 2
            pads = [(0, 0)] * out.ndim
            pads[axis] = (before, target - n - before)
            out = np.pad(out, pads)
    return out


def load_case(case: CaseRecord, config: PreprocessConfig) -> np.ndarray:
    """Preprocessed (D, H, W, 3) float32 input for one manifest row."""
    channels, reference = [], None
    for role in IMAGE_COLUMNS:
        volume, affine = load_nifti(case.images[role])
        if reference is None:
            reference = (volume.shape, affine)
        elif volume.shape != reference[0]:
            raise VolumeError(f"{case.images[role]}: grid {volume.shape} differs from T2w's {reference[0]} "
                              f"(case {case.case_id!r}, line {case.line})")
        if not np.isfinite(volume).all():
            raise VolumeError(f"{case.images[role]}: contains NaN or Inf voxels")
        channels.append(crop_or_pad(znormalise(volume), config.input_size))
    return np.stack(channels, axis=-1).astype(np.float32)
