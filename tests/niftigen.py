"""NIfTI files and manifests for the data tests, written exactly as specified (orientation, dtype,
byte order, scaling), so the loader is checked against an independent expectation."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def smooth_volume(shape: Sequence[int], seed: int = 0, positive: bool = True) -> np.ndarray:
    """A smooth random field (float32), strictly positive by default."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    return (field + (0.5 if positive else -0.5)).astype(np.float32)


def ras_affine(spacing: Sequence[float] = (0.5, 0.6, 3.0), origin: Sequence[float] = (-10.0, 5.0, 20.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def to_storage(ras: np.ndarray, affine_ras: np.ndarray, perm: Sequence[int], flips: Sequence[bool]):
    """Store an array given in RAS voxel order with stored axis `a` = RAS axis `perm[a]`, reversed
    where `flips[a]`: returns (stored array, stored affine) describing the same image."""
    stored = ras.transpose(perm)
    index_map = np.zeros((4, 4))  # stored index -> RAS index
    index_map[3, 3] = 1
    for a, (r, f) in enumerate(zip(perm, flips, strict=True)):
        n = ras.shape[r]
        if f:
            stored = np.flip(stored, axis=a)
            index_map[r, a], index_map[r, 3] = -1, n - 1
        else:
            index_map[r, a] = 1
    return np.ascontiguousarray(stored), affine_ras @ index_map


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    dtype=np.float32,
    slope: float | None = None,
    inter: float | None = None,
    big_endian: bool = False,
    codes: tuple[int, int] = (1, 1),
    pixdim: Sequence[float] | None = None,
) -> Path:
    """Write `data` (already in the stored dtype's range when scaled) byte for byte: the header
    (sform/qform codes, scl_slope/inter, byte order) is exactly what is asked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    endian = ">" if big_endian else "<"
    dt = np.dtype(dtype).newbyteorder(endian)
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_dtype(dt)
    header.set_data_shape(data.shape)
    header.set_sform(affine, code=codes[0])
    header.set_qform(affine, code=codes[1])
    if pixdim is not None:
        header["pixdim"][1 : 1 + len(pixdim)] = pixdim
    header["scl_slope"] = np.nan if slope is None else slope
    header["scl_inter"] = (np.nan if slope is None else 0.0) if inter is None else inter
    header["vox_offset"] = 352
    payload = np.asarray(data).astype(dt).tobytes(order="F")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header.binaryblock)
        f.write(b"\0" * 4)  # no extensions
        f.write(payload)
    return path


def write_case(
    folder: Path, case_id: str, shape=(12, 10, 6), affine=None, seed: int = 0, suffix: str = ".nii.gz", **kwargs
) -> dict[str, str]:
    """Three aligned positive volumes; returns the manifest cells (paths relative to `folder`)."""
    affine = ras_affine() if affine is None else affine
    cells = {}
    for c, role in enumerate(("t2w", "highb", "adc")):
        name = f"{case_id}_{role}{suffix}"
        write_nifti(folder / name, smooth_volume(shape, seed * 3 + c), affine, **kwargs)
        cells[role] = name
    return cells


def write_manifest(
    path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None, newline: str = "\n", bom: bool = False
) -> Path:
    columns = list(columns or rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator=newline, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_study(folder: Path, n: int = 12, shape=(12, 10, 6), seed: int = 0) -> Path:
    """A small valid study: n cases, alternating HQ/LQ, PI-RADS spread over 2-5."""
    rows = []
    for i in range(n):
        cells = write_case(folder, f"c{i:03d}", shape=shape, seed=seed * 1000 + i)
        rows.append(
            {"case_id": f"c{i:03d}", **cells, "pirads": str(2 + (i // 2) % 4), "quality": "hq" if i % 2 == 0 else "lq"}
        )
    return write_manifest(folder / "manifest.csv", rows)
