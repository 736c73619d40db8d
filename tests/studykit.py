"""Test kit for the reliability tests: tiny NIfTI studies written to a tmp dir, and `python -m
pfq.train` in a subprocess.

The studies are independent of the phantom generator: random volumes with a label-dependent bright
blob, so a small model has something to learn. Everything derives from `seed`, so two calls write
identical files.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

ROLES = ("t2w", "highb", "adc")
HEADER = ["case_id", "pirads", "isup", "quality", "t2w", "highb", "adc"]


def volume(rng: np.random.Generator, shape: tuple[int, int, int], label: int, hq: bool) -> np.ndarray:
    """(i, j, k) = (W, H, D) voxel array as nibabel stores it."""
    d, h, w = shape
    data = rng.normal(100.0, 10.0 if hq else 30.0, size=(w, h, d)).astype(np.float32)
    if label:
        data[w // 4 : w // 2, h // 4 : h // 2, d // 4 : d // 2] += 60.0
    return data


def save_nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 2.0), affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag(list(spacing) + [1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_study(
    root: Path,
    cases: int = 48,
    shape=(16, 32, 32),
    seed: int = 0,
    image_dir: str = "images",
    edit_row: Callable[[int, dict], dict | None] | None = None,
) -> Path:
    """Write `cases` cases and `root/manifest.csv`; returns the manifest path.

    Half the cases are HQ and half have PI-RADS >= 4, balanced across quality. `edit_row(i, row)` may
    change a row before it is written (or return None to drop it).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(cases):
        hq, positive = i % 2 == 0, (i // 2) % 2 == 0
        pirads = int(rng.choice([4, 5])) if positive else int(rng.choice([1, 2, 3]))
        row = {
            "case_id": f"c{i:03d}",
            "pirads": str(pirads),
            "isup": str(int(positive) * 2),
            "quality": "hq" if hq else "lq",
        }
        for role in ROLES:
            rel = f"{image_dir}/c{i:03d}_{role}.nii.gz"
            save_nifti(root / rel, volume(rng, shape, int(positive), hq))
            row[role] = rel
        if edit_row is not None:
            row = edit_row(i, row)
        if row is not None:
            rows.append(row)
    return write_manifest(root / "manifest.csv", rows)


def write_manifest(
    path: Path, rows: list[dict], header: list[str] | None = None, encoding: str = "utf-8", lineterminator: str = "\n"
) -> Path:
    header = header or (list(rows[0]) if rows else HEADER)
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator=lineterminator, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# The CLI in a subprocess.
# ----------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
KILLED = -9  # subprocess return code of a SIGKILLed child

# The smoke config cut to 2 lanes, 6 steps with checkpoints at 2, 4, 6, and a cheap bootstrap.
SMALL_SWEEP = (
    "--config.sweep.finetune_hq_ratios=(0.0,1.0)",
    "--config.sweep.seeds=(0,)",
    "--config.sweep.bootstrap_resamples=50",
    "--config.checkpoint.every_steps=2",
)


def small_sweep_config(manifest: Path):
    """The in-process equivalent of the `smoke` config + SMALL_SWEEP (same config.json)."""
    from pfq.configs import smoke

    c = smoke.get_config()
    c.data.manifest = str(manifest)
    c.sweep.finetune_hq_ratios = (0.0, 1.0)
    c.sweep.seeds = (0,)
    c.sweep.bootstrap_resamples = 50
    c.checkpoint.every_steps = 2
    return c


def cli_env(
    jax_cache: Path | None = None,
    fault: str | None = None,
    pfq_cache: Path | None = None,
    devices: int | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFQ_FAULT")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if pfq_cache is not None:  # preprocessed volumes (config.data.cache_dir stays empty)
        env["PFQ_CACHE"] = str(pfq_cache)
    if jax_cache is not None:  # compiled programs shared by all runs of a test session
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(jax_cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    if devices is not None:  # fake CPU devices
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if fault:
        env["PFQ_FAULT_POINT"] = fault
    env.update(extra or {})
    return env


def train_command(workdir: Path, manifest: Path | None, *extra: str, sweep: Sequence[str] = SMALL_SWEEP) -> list[str]:
    """`python -m pfq.train` on the smoke config; `manifest` None: the smoke config's phantoms."""
    data = [] if manifest is None else [f"--config.data.manifest={manifest}"]
    return [
        sys.executable,
        "-m",
        "pfq.train",
        "--config",
        str(REPO / "configs" / "smoke.py"),
        *data,
        "--workdir",
        str(workdir),
        "--noprogress",
        *sweep,
        *extra,
    ]


def run_train(
    workdir: Path,
    manifest: Path | None,
    *extra: str,
    fault: str | None = None,
    jax_cache: Path | None = None,
    pfq_cache: Path | None = None,
    devices: int | None = None,
    sweep: Sequence[str] = SMALL_SWEEP,
    env_extra: dict | None = None,
    background: bool = False,
    timeout: float = 600,
    **kwargs,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """The CLI in a subprocess (finished, or started with `background`: stdout and stderr merged)."""
    command = train_command(workdir, manifest, *extra, sweep=sweep)
    env = cli_env(jax_cache, fault, pfq_cache, devices, env_extra)
    if background:
        return subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
        )
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to show that nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
