"""Input-pipeline throughput, side by side in one run (a few minutes on 2 CPU cores).

    PYTHONPATH=. python benchmarks/bench_pipeline.py [--cases 6] [--real-step-ms 500] [--skip-model]

Part A, real size (3 x 64 x 224 x 224 after preprocessing). Synthetic smooth volumes are written as
NIfTI on a PI-CAI-like native grid: T2w 384 x 384 x 19 at 0.5 x 0.5 x 3.0 mm, big-endian int16 with
scl_slope; high-b and ADC 128 x 128 x 19 at 1.5 x 1.5 x 3.0 mm, so both are resampled onto T2w's grid,
and everything is resampled to 1.0 x 0.5 x 0.5 mm (the real-size configs' spacing). Reported:
- volumes/s preprocessed from NIfTI (decode, reorient, resample, z-normalise, crop/pad);
- volumes/s read from the cache (memory-mapped .npy, page cache warm: the files were just written);
- the lane pipeline (Grain, default augmentation, default workers) producing lane-stacked batches
  from the cache: milliseconds per step (also without augmentation, to show its cost, and with the
  `upstream` preset that the real-size configs use), and the
  fraction of time the loop waits for input when each step is simulated by a sleep of
  --real-step-ms (a sleep leaves the cores to the pipeline, as an accelerator step does).

Part B, the default CPU config (ProFound-Conv atto, 32 x 64 x 64, 6 lanes x batch 8, workers 0):
the fraction of a training run's time spent waiting for input, with the real vmapped, jitted train
step on the CPU (it competes with the pipeline for the same cores, as in a real CPU run).

First, the CPU time per real-size volume of each augmentation preset (`pfq`, the default, and
`upstream`, the real-size configs'), on the same volumes and draws (`--augment-only`: just this).

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfq import xla_flags  # noqa: E402
from pfq.config import base_config  # noqa: E402
from pfq.data.cache import CachedVolumes, VolumeCache  # noqa: E402
from pfq.data.manifest import read_manifest  # noqa: E402
from pfq.data.pipeline import AugmentConfig, augment, to_iterator, train_dataset  # noqa: E402
from pfq.data.preprocess import PreprocessConfig, load_case  # noqa: E402


def smooth(shape, seed: int) -> np.ndarray:
    """A smooth positive field: low-resolution noise upsampled (cheap at full size)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random(tuple(max(2, n // 8) for n in shape))
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape, strict=True)], order=1)
    return field[tuple(slice(0, n) for n in shape)]


def write_volume(path: Path, shape, spacing, seed: int) -> None:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(shape) * spacing / 2
    raw = (smooth(shape, seed) * 3000 + 50).astype(">i2")
    image = nib.Nifti1Image(raw, affine)
    image.header.set_data_dtype(">i2")
    image.header.set_slope_inter(0.5, 0.0)
    nib.save(image, str(path))


def write_cases(folder: Path, n: int, t2w_shape, t2w_spacing, dwi_shape, dwi_spacing, pirads=None) -> Path:
    rows = ["case_id,t2w,highb,adc,pirads,quality"]
    for i in range(n):
        for role, shape, spacing in (
            ("t2w", t2w_shape, t2w_spacing),
            ("highb", dwi_shape, dwi_spacing),
            ("adc", dwi_shape, dwi_spacing),
        ):
            write_volume(folder / f"c{i}_{role}.nii.gz", shape, spacing, seed=3 * i + len(role))
        label = pirads[i] if pirads is not None else 2 + i % 4
        rows.append(f"c{i},c{i}_t2w.nii.gz,c{i}_highb.nii.gz,c{i}_adc.nii.gz,{label},{'hq' if i % 2 else 'lq'}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def input_wait(iterator, steps: int, step) -> tuple[float, float]:
    """(fraction of loop time spent in next(iterator), seconds per step) after one warm-up step."""
    step(next(iterator))
    waited, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(iterator)
        waited += time.perf_counter() - t
        step(batch)
    total = time.perf_counter() - t0
    return waited / total, total / steps


def part_a(folder: Path, args) -> dict:
    manifest = read_manifest(
        write_cases(folder, args.cases, (384, 384, 19), (0.5, 0.5, 3.0), (128, 128, 19), (1.5, 1.5, 3.0))
    )
    config = PreprocessConfig(input_size=(64, 224, 224), spacing=(1.0, 0.5, 0.5))
    t = time.perf_counter()
    for case in manifest.cases:
        load_case(case, config)
    nifti = len(manifest) / (time.perf_counter() - t)

    cache = VolumeCache(folder / "cache", config)
    paths, problems = cache.prepare(manifest.cases, progress=False)
    assert not problems, problems
    source = CachedVolumes(paths)
    reads, t = 0, time.perf_counter()
    while time.perf_counter() - t < 3.0:
        np.array(source[reads % len(source)])  # a full copy: every byte is read
        reads += 1
    cached = reads / (time.perf_counter() - t)

    lanes, batch = args.lanes, args.batch
    labels = np.arange(len(manifest)) % 2
    data = base_config().data
    workers = int(data.workers) if args.workers is None else args.workers

    def lane_dataset(augment_config):
        return train_dataset(
            source,
            labels,
            [np.arange(len(manifest))] * lanes,
            list(range(lanes)),
            batch_size=batch,
            num_steps=args.steps + 2,
            augment_config=augment_config,
        )

    def seconds_per_step(ds) -> float:
        it = to_iterator(ds, workers=workers)
        next(it)  # start-up (threads, worker processes) is not throughput
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        return (time.perf_counter() - t0) / args.steps

    dataset = lane_dataset(AugmentConfig.from_config(data))
    produce = seconds_per_step(dataset)
    produce_plain = seconds_per_step(lane_dataset(AugmentConfig(enabled=False)))
    produce_upstream = seconds_per_step(lane_dataset(AugmentConfig(preset="upstream")))  # the real-size configs'
    sleep_s = args.real_step_ms / 1000
    it = to_iterator(dataset, workers=workers)
    wait, per_step = input_wait(it, args.steps, lambda b: time.sleep(sleep_s))
    return {
        "real_size": [3, 64, 224, 224],
        "native_t2w": [384, 384, 19],
        "native_dwi": [128, 128, 19],
        "nifti_volumes_per_s": round(nifti, 3),
        "cache_volumes_per_s": round(cached, 1),
        "cache_speedup": round(cached / nifti, 1),
        "real_lanes_x_batch": [lanes, batch],
        "real_pipeline_ms_per_step": round(produce * 1000, 1),
        "real_pipeline_ms_per_step_no_augment": round(produce_plain * 1000, 1),
        "real_pipeline_ms_per_step_upstream_augment": round(produce_upstream * 1000, 1),
        "real_step_sleep_ms": args.real_step_ms,
        "real_input_wait_fraction": round(wait, 4),
        "real_workers": workers,
    }


def augment_cpu(args) -> dict:
    """CPU seconds per real-size volume of each augmentation preset, on the same volumes and draws
    (process time, so that other jobs on the machine inflate it little)."""
    volumes = [np.random.default_rng(i).normal(size=(64, 224, 224, 3)).astype(np.float32) for i in range(2)]
    out = {}
    for preset in ("pfq", "upstream"):
        config = AugmentConfig.from_config(base_config().data) if preset == "pfq" else AugmentConfig(preset=preset)
        t = time.process_time()
        for i in range(args.augment_draws):
            augment(volumes[i % 2], np.random.default_rng(i), config)
        out[f"augment_cpu_s_per_volume_{preset}"] = round((time.process_time() - t) / args.augment_draws, 3)
    return out


def part_b(folder: Path, args) -> dict:
    import jax
    import jax.numpy as jnp

    from pfq.model import init_variables
    from pfq.tasks import get_task
    from pfq.train.optim import make_optimizer
    from pfq.train.step import init_state, make_train_step
    from pfq.train.trainer import model_spec, stack

    config = base_config()
    size = tuple(config.data.input_size)
    lanes = len(config.sweep.finetune_hq_ratios) * len(config.sweep.seeds)
    batch = int(config.optim.batch_size)
    n = 40
    manifest = read_manifest(write_cases(folder, n, (64, 64, 32), (1.0, 1.0, 2.0), (64, 64, 32), (1.0, 1.0, 2.0)))
    cache = VolumeCache(folder / "cache", PreprocessConfig.from_config(config.data))
    paths, _ = cache.prepare(manifest.cases, progress=False)
    labels = np.arange(n) % 2
    dataset = train_dataset(
        CachedVolumes(paths),
        labels,
        [np.arange(n)] * lanes,
        list(range(lanes)),
        batch_size=batch,
        num_steps=args.model_steps + 2,
        augment_config=AugmentConfig.from_config(config.data),
    )

    spec = model_spec(config, get_task(config.task).num_classes)
    variables = stack([init_variables(spec, jax.random.key(i)) for i in range(lanes)])
    tx = make_optimizer(config.optim, jax.tree.map(lambda x: x[0], variables["params"]), spec.depths, 1000)
    state = jax.jit(jax.vmap(lambda v: init_state(v, tx)))(variables)
    keys = jnp.stack([jax.random.key(i) for i in range(lanes)])
    step_fn = jax.jit(jax.vmap(make_train_step(spec, tx, config.optim.loss)), donate_argnums=0)
    holder = {"state": state}

    def step(b):
        holder["state"], metrics = step_fn(holder["state"], b, keys)
        jax.block_until_ready(metrics["loss"])

    t = time.perf_counter()
    step(next(to_iterator(dataset)))  # compile
    compile_s = time.perf_counter() - t
    wait, per_step = input_wait(to_iterator(dataset, workers=int(config.data.workers)), args.model_steps, step)
    return {
        "default_input": [3, *size],
        "default_lanes_x_batch": [lanes, batch],
        "default_step_s": round(per_step, 3),
        "default_compile_s": round(compile_s, 1),
        "default_input_wait_fraction": round(wait, 4),
        "default_workers": int(config.data.workers),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=6, help="real-size cases to write")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--real-step-ms", type=float, default=500.0, help="simulated step at real size (sleep)")
    p.add_argument("--workers", type=int, default=None, help="Grain workers at real size (default: the config's)")
    p.add_argument("--model-steps", type=int, default=4, help="timed default-config train steps")
    p.add_argument("--skip-model", action="store_true", help="skip part B (no model compile)")
    p.add_argument("--augment-draws", type=int, default=20, help="volumes augmented per preset (CPU time)")
    p.add_argument("--augment-only", action="store_true", help="only the augmentation presets' CPU time")
    args = p.parse_args()
    figures = augment_cpu(args)
    print(
        f"real-size augmentation, CPU s per volume: pfq preset {figures['augment_cpu_s_per_volume_pfq']:.2f}, "
        f"upstream preset {figures['augment_cpu_s_per_volume_upstream']:.2f} "
        f"({figures['augment_cpu_s_per_volume_upstream'] / figures['augment_cpu_s_per_volume_pfq']:.1f}x)"
    )
    if args.augment_only:
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a").mkdir()
        figures.update(part_a(Path(tmp) / "a", args))
        print(
            f"real size 3x64x224x224: from NIfTI {figures['nifti_volumes_per_s']:.2f} vol/s | "
            f"from cache {figures['cache_volumes_per_s']:.1f} vol/s ({figures['cache_speedup']:.0f}x)"
        )
        print(
            f"real size lane pipeline ({args.lanes} lanes x batch {args.batch}, augmenting, "
            f"{figures['real_workers']} workers): "
            f"{figures['real_pipeline_ms_per_step']:.0f} ms/step "
            f"({figures['real_pipeline_ms_per_step_no_augment']:.0f} without augmentation, "
            f"{figures['real_pipeline_ms_per_step_upstream_augment']:.0f} with the upstream preset, "
            f"{figures['real_pipeline_ms_per_step_upstream_augment'] / figures['real_pipeline_ms_per_step']:.1f}x); "
            "input wait "
            f"{100 * figures['real_input_wait_fraction']:.1f}% with a {args.real_step_ms:.0f} ms (sleep) step"
        )
        if not args.skip_model:
            (Path(tmp) / "b").mkdir()
            figures.update(part_b(Path(tmp) / "b", args))
            print(
                f"default CPU config ({figures['default_lanes_x_batch'][0]} lanes x batch "
                f"{figures['default_lanes_x_batch'][1]}, 3x{'x'.join(map(str, figures['default_input'][1:]))}, "
                f"workers {figures['default_workers']}): real train step {figures['default_step_s']:.2f} s; "
                f"input wait {100 * figures['default_input_wait_fraction']:.1f}%"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    main()
