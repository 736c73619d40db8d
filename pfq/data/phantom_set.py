"""Phantom sets on disk: cases from `pfq.data.phantoms` written as NIfTI files with a manifest, the
cache of sets keyed by their parameters, and the `python -m pfq.data synth` command.

A set is a folder with ``images/<case_id>_{t2w,highb,adc}.nii.gz``, ``manifest.csv`` and
``phantoms.json`` (parameters and per-case details). Case i depends only on (seed, i), so a set's
files are the same on every machine and in every run: processes that write the same set at once
(the hosts of one run, or two runs) write identical files, each through its own temporary names.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import pathlib
from dataclasses import asdict

import numpy as np

from pfq.data.phantoms import (
    CHANNELS,
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    SEVERITY_COLUMNS,
    Shape,
    Spacing,
    generate_case,
)
from pfq.io import atomic_path, atomic_write_text


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a set: depends on (seed, index) only, so sets grow stably."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def assign_qualities(n_cases: int, hq_fraction: float, seed: int) -> list[str]:
    """Exactly round(hq_fraction * n) 'hq' cases, in a seeded random order.

    Case i is 'hq' when its own key u_i ~ U(0, 1) (a function of (seed, i)) is among the n_hq
    smallest keys, so adding cases to a set only flips cases near the threshold.
    """
    if not 0.0 <= hq_fraction <= 1.0:
        raise ValueError(f"hq_fraction must be in [0, 1], got {hq_fraction}")
    keys = np.array([np.random.default_rng([int(seed), i, 7]).random() for i in range(n_cases)])
    n_hq = round(hq_fraction * n_cases)
    hq = set(np.argsort(keys, kind="stable")[:n_hq].tolist())
    return ["hq" if i in hq else "lq" for i in range(n_cases)]


def save_nifti(arr: np.ndarray, spacing: Spacing, path: pathlib.Path) -> None:
    """Write a (D, H, W) array as a RAS-canonical NIfTI (file axes i, j, k = W, H, D).

    Stored as int16 with ``scl_slope = max|arr| / 32767`` and no intercept, the way scanners store
    maps: half the size and gzip time of float32, error <= slope / 2 (1.5e-5 of the maximum); exactly
    the zero voxels (e.g. clipped ADC) are zero, as non-zero-voxel normalisation needs.
    """
    import nibabel as nib

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    peak = float(np.abs(arr).max())
    slope = peak / 32767.0 if peak > 0 else 1.0
    values = arr.transpose(2, 1, 0)
    data = np.round(values / slope).astype(np.int16)
    tiny = (data == 0) & (values != 0)
    data[tiny] = np.sign(values[tiny]).astype(np.int16)  # keep the zero / non-zero pattern exact
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # nibabel picks the format from the name; the set is regenerable, so no flush per image
    with atomic_path(path, suffix=".nii.gz", durable=False) as tmp:
        nib.save(img, tmp)


def _set_params(
    n_cases: int, seed: int, shape: Shape, spacing: Spacing, hq_fraction: float, lesion_scale: float = 1.0
) -> dict:
    return {
        "lesion_scale": float(lesion_scale),
        "generator_version": GENERATOR_VERSION,
        "n_cases": int(n_cases),
        "seed": int(seed),
        "shape": [int(v) for v in shape],
        "spacing": [float(v) for v in spacing],
        "hq_fraction": float(hq_fraction),
    }


def _is_complete(out: pathlib.Path, params: dict) -> bool:
    """A set is reusable when its record matches and the manifest and every image exist."""
    record, manifest = out / "phantoms.json", out / "manifest.csv"
    if not (record.is_file() and manifest.is_file()):
        return False
    try:
        if json.loads(record.read_text()).get("params") != params:
            return False
        with manifest.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError):
        return False
    paths = [out / row[ch] for row in rows for ch in CHANNELS]
    return len(rows) == params["n_cases"] and all(p.is_file() for p in paths)


def write_phantom_set(
    out_dir: str | os.PathLike,
    n_cases: int,
    *,
    seed: int = 0,
    shape: Shape = (32, 64, 64),
    spacing: Spacing = (2.0, 1.0, 1.0),
    hq_fraction: float = 0.5,
    progress: bool = True,
    lesion_scale: float = 1.0,
) -> pathlib.Path:
    """Write ``n_cases`` phantoms as NIfTI files plus ``manifest.csv``; return the manifest's path.

    Layout: ``images/<case_id>_{t2w,highb,adc}.nii.gz``, ``manifest.csv`` (columns
    ``case_id,t2w,highb,adc,pirads,isup,quality``, then ``severity_<artefact>`` per artefact of
    ``degrade.ARTEFACTS``; paths relative to the manifest's folder) and
    ``phantoms.json`` (parameters and per-case details). Images are written first, then the manifest,
    then the record, each atomically; a complete set with the same parameters is reused as is.
    """
    from tqdm import tqdm

    out = pathlib.Path(out_dir)
    params = _set_params(n_cases, seed, shape, spacing, hq_fraction, lesion_scale)
    manifest = out / "manifest.csv"
    if _is_complete(out, params):
        _add_severity_columns(out)
        return manifest
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / "phantoms.json").unlink(missing_ok=True)  # an interrupted rewrite must not look complete

    qualities = assign_qualities(n_cases, hq_fraction, seed)
    rows, details = [], []
    for i in tqdm(range(n_cases), desc="phantoms", unit="case", disable=not progress):
        cid, cseed = f"phantom_{i:05d}", case_seed(seed, i)
        case = generate_case(cseed, quality=qualities[i], shape=shape, spacing=spacing, lesion_scale=lesion_scale)
        row = {"case_id": cid}
        for ch in CHANNELS:
            rel = f"images/{cid}_{ch}.nii.gz"
            save_nifti(getattr(case, ch), case.spacing, out / rel)
            row[ch] = rel
        row.update(pirads=case.pirads, isup=case.isup, quality=case.quality)
        row.update({f"severity_{a}": round(v, 4) for a, v in case.severities.items()})
        rows.append(row)
        details.append(
            {
                "case_id": cid,
                "case_seed": cseed,
                "severity": round(case.severity, 4),
                "severities": {a: round(v, 4) for a, v in case.severities.items()},
                "lesions": [asdict(les) for les in case.lesions],
            }
        )

    atomic_write_text(manifest, _manifest_text(rows))
    record = {"params": params, "cases": details}
    atomic_write_text(out / "phantoms.json", json.dumps(record, indent=1))
    return manifest


def _add_severity_columns(out: pathlib.Path) -> None:
    """Sets written before per-artefact severities: add the columns from the record (every artefact
    at the case's one severity, as those sets were made), without regenerating the images."""
    with (out / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        if set(SEVERITY_COLUMNS) <= set(reader.fieldnames or ()):
            return
    cases = {c["case_id"]: c for c in json.loads((out / "phantoms.json").read_text())["cases"]}
    for row in rows:
        s = cases[row["case_id"]]["severity"]
        row.update({col: s for col in SEVERITY_COLUMNS})
    atomic_write_text(out / "manifest.csv", _manifest_text(rows))


def _manifest_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def synth_main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m pfq.data synth --out DIR --cases N [--seed S] [--shape D H W] ...``."""
    parser = argparse.ArgumentParser(prog="pfq.data synth", description="Write a synthetic phantom set.")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    parser.add_argument("--cases", required=True, type=int, help="number of cases (patients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 1.0, 1.0], metavar=("SD", "SH", "SW"))
    parser.add_argument("--hq-fraction", type=float, default=0.5)
    parser.add_argument("--lesion-scale", type=float, default=1.0, help="multiply lesion diameters")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    manifest = write_phantom_set(
        args.out,
        args.cases,
        seed=args.seed,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing),
        hq_fraction=args.hq_fraction,
        lesion_scale=args.lesion_scale,
        progress=not args.no_progress,
    )
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    positive = sum(int(r["pirads"]) >= 4 for r in rows)
    n_hq = sum(r["quality"] == "hq" for r in rows)
    print(f"{manifest}: {len(rows)} cases ({n_hq} hq), PI-RADS >= 4 in {positive}")
    return 0


def cache_root() -> pathlib.Path:
    """`$PFQ_CACHE`, else `~/.cache/pfq`; generated sets go to `phantoms/<parameter digest>` there."""
    return pathlib.Path(os.environ.get("PFQ_CACHE", pathlib.Path.home() / ".cache" / "pfq"))


def phantom_manifest(phantoms, progress: bool = True) -> pathlib.Path:
    """The manifest of the phantom set that config section `phantoms` describes, generated unless a
    complete copy exists: in `phantoms.dir`, or else in the cache folder keyed by the parameters."""
    params = {
        "cases": int(phantoms.cases),
        "seed": int(phantoms.seed),
        "shape": list(phantoms.shape),
        "spacing": list(phantoms.spacing),
        "hq_fraction": float(phantoms.hq_fraction),
        "lesion_scale": float(phantoms.lesion_scale),
    }
    if phantoms.dir:
        out = pathlib.Path(phantoms.dir)
    else:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        out = cache_root() / "phantoms" / digest
    return write_phantom_set(
        out,
        params["cases"],
        seed=params["seed"],
        shape=tuple(params["shape"]),
        spacing=tuple(params["spacing"]),
        hq_fraction=params["hq_fraction"],
        lesion_scale=params["lesion_scale"],
        progress=progress,
    )
