"""The pretrainer: unlabelled pool -> seeds as lanes -> one compiled FCMAE step -> the encoder as a
pfq model directory, upstream's format-B checkpoint, the loss curve and a reconstruction figure.

It reuses the finetuning machinery: Grain lane streams, the (lane, data) mesh, per-host loading,
Orbax checkpoints with the data iterator's state (a kill anywhere resumes to the same weights), the
workdir lock and config record, and the non-finite-lane freezing of the training step.

Workdir layout: `model/` (encoder of the first seed; `model-s<seed>/` for the others), `fcmae.safetensors`
(format B, every seed likewise), `loss.csv`, `loss.png`, `reconstruction.png`, `config.json`,
`run.json`, `checkpoints/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from pfq.data.cache import CachedVolumes, VolumeCache, default_cache_root
from pfq.data.manifest import ManifestError, Problem
from pfq.data.phantom_set import cache_root, phantom_manifest
from pfq.data.pipeline import AugmentConfig, to_iterator, train_dataset
from pfq.data.preprocess import PreprocessConfig
from pfq.data.validate import validate_manifest
from pfq.io import atomic_write_text
from pfq.model import ModelSpec
from pfq.pretrain import model as fcmae
from pfq.pretrain.step import make_pretrain_step, make_tx, pretrain_init_state
from pfq.train import lanes as lanes_lib
from pfq.train import program
from pfq.train import workdir as workdir_lib
from pfq.train.checkpoint import GroupCheckpointer
from pfq.train.distributed import is_writer, local_box, to_host
from pfq.train.loop import train_loop
from pfq.train.trainer import stack, write_csv

log = logging.getLogger("pfq.pretrain")
QUALITIES = ("all", "hq", "lq")


# ----------------------------------------------------------------------------------------------
# What a pretraining depends on: the record that keys its workdir (and the cached default pretraining).
# ----------------------------------------------------------------------------------------------
def pretrain_record(config: ConfigDict) -> dict:
    """Every config field that changes the pretrained weights, and nothing else."""
    p, m, d = config.pretrain, config.model, config.data
    return {
        "pretrain": {k: v for k, v in p.to_dict().items() if k not in ("checkpoint_every",)},
        "model": {k: m.get(k) for k in ("size", "depths", "dims", "depthwise", "dtype")},
        "phantoms": {k: config.phantoms.get(k) for k in ("spacing", "lesion_scale")},
        "data": {
            k: d.get(k)
            for k in ("spacing", "augment", "augment_rotate_deg", "augment_zoom", "quality_scale", "quality_threshold")
        },
    }


def fcmae_spec(config: ConfigDict) -> fcmae.FCMAESpec:
    p, m = config.pretrain, config.model
    kwargs = dict(depthwise_impl=m.depthwise, dtype=m.dtype)
    encoder = (
        ModelSpec(depths=tuple(m.depths), dims=tuple(m.dims), **kwargs)
        if m.get("depths") and m.get("dims")
        else ModelSpec.from_size(m.size, **kwargs)
    )
    return fcmae.FCMAESpec(
        encoder,
        decoder_dim=int(p.decoder_dim),
        decoder_depth=int(p.decoder_depth),
        mask_ratio=float(p.mask_ratio),
        norm_pix_loss=bool(p.norm_pix_loss),
        grn_stats=str(p.grn_stats),
        init=str(p.init),
    )


def validate_pretrain_config(config: ConfigDict) -> None:
    p = config.pretrain
    if p.quality not in QUALITIES:
        raise ValueError(f"config.pretrain.quality must be one of {QUALITIES}, got {p.quality!r}")
    if not 0.0 <= float(p.hq_fraction) <= 1.0:
        raise ValueError(f"config.pretrain.hq_fraction {p.hq_fraction} is outside [0, 1]")
    if int(p.steps) <= 0 or int(p.batch_size) <= 0 or len(p.seeds) == 0:
        raise ValueError("config.pretrain.steps and batch_size must be positive and seeds non-empty")
    try:
        fcmae.grid_shape(tuple(p.input_size))
        fcmae_spec(config)
    except ValueError as e:
        raise ValueError(f"config.pretrain: {e}") from None


# ----------------------------------------------------------------------------------------------
# The unlabelled pool.
# ----------------------------------------------------------------------------------------------
def pretrain_pool(config: ConfigDict, progress: bool = True) -> tuple[CachedVolumes, np.ndarray]:
    """(preprocessed volumes, indices of the cases to pretrain on). A manifest needs only the image
    columns (and `quality` when `pretrain.quality` filters on it); without one, a phantom pool with
    its own seed (disjoint from the finetuning and test phantoms) and `pretrain.hq_fraction` HQ cases."""
    p, d = config.pretrain, config.data
    if p.manifest:
        path = Path(p.manifest)
    else:
        path = phantom_manifest(
            ConfigDict(
                {
                    "cases": p.cases,
                    "seed": p.phantom_seed,
                    "shape": tuple(p.input_size),
                    "spacing": tuple(config.phantoms.spacing),
                    "hq_fraction": p.hq_fraction,
                    "lesion_scale": config.phantoms.lesion_scale,
                    "dir": "",
                }
            ),
            progress,
        )
    report = validate_manifest(
        path,
        task=None,
        quality_scale=d.get("quality_scale", "piqual_v1"),
        quality_threshold=d.get("quality_threshold"),
        require_quality=p.quality != "all",
        check_images=False,
    )
    if report.manifest is None:
        raise ManifestError(path, report.problems)
    preprocess = PreprocessConfig.from_config(ConfigDict({"input_size": tuple(p.input_size), "spacing": d.spacing}))
    cache = VolumeCache(d.get("cache_dir") or default_cache_root(), preprocess)
    cases = [c for c in report.manifest.cases if len(c.images) == 3]
    paths, problems = cache.prepare(
        cases,
        workers=int(d.get("prepare_workers", 0)),
        progress=progress,
        desc="preprocessing pretraining pool (cached)",
    )
    problems = list(report.problems) + problems
    if problems:
        raise ManifestError(path, sorted(problems, key=lambda q: q.line if q.line is not None else 0))
    chosen = np.arange(len(cases)) if p.quality == "all" else np.flatnonzero([c.quality == p.quality for c in cases])
    if len(chosen) == 0:
        raise ManifestError(path, [Problem(f"config.pretrain.quality={p.quality!r} selects no case", column="quality")])
    return CachedVolumes(paths), chosen


# ----------------------------------------------------------------------------------------------
class Pretrainer:
    def __init__(self, config: ConfigDict, workdir: Path, progress: bool = True, overwrite: bool = False):
        self.config, self.workdir, self.progress, self.overwrite = config, Path(workdir), progress, overwrite
        self.spec = fcmae_spec(config)
        self.record = json.dumps(pretrain_record(config), sort_keys=True)

    def finished(self) -> bool:
        """True when the workdir holds this pretraining, finished (never with `overwrite`); raises
        `WorkdirError` for a workdir of another config, before anything is written."""
        if self.overwrite:
            return False
        workdir_lib.inspect(self.workdir, self.record, False)
        try:
            status = json.loads((self.workdir / "run.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(status.get("complete")) and (self.workdir / "model").is_dir()

    def run(self) -> Path:
        """Pretrain (or find the finished pretraining) and return the first seed's model directory."""
        if self.finished():
            log.info("%s already holds this pretraining; pass --overwrite to run it again", self.workdir)
            return self.workdir / "model"
        source, pool = pretrain_pool(self.config, self.progress)
        with workdir_lib.exclusive(self.workdir) if is_writer() else contextlib.nullcontext():
            workdir_lib.prepare(self.workdir, self.record, self.overwrite, write=is_writer())
            state = self.train(source, pool)
            if is_writer():
                self.write_outputs(state, source, pool)
        return self.workdir / "model"

    def train(self, source, pool: np.ndarray) -> dict:
        p = self.config.pretrain
        seeds = [int(s) for s in p.seeds]
        steps, batch_size = int(p.steps), int(p.batch_size)
        mesh = lanes_lib.make_mesh(len(seeds), batch_size)
        lane_sh, batch_sh = lanes_lib.lane_sharding(mesh), lanes_lib.batch_sharding(mesh)
        params = stack([fcmae.init_params(self.spec, jax.random.key(s)) for s in seeds])
        tx = make_tx(p, jax.tree.map(lambda x: x[0], params), self.spec, steps)
        state = jax.jit(jax.vmap(lambda q: pretrain_init_state(q, tx, steps)), out_shardings=lane_sh)(params)
        lane_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 2))
        keys = jax.jit(lane_keys, out_shardings=lane_sh)(np.array(seeds, np.uint32))
        box = local_box(batch_sh, (len(seeds), batch_size))
        augment = replace(AugmentConfig.from_config(self.config.data), enabled=bool(p.augment))
        dataset = train_dataset(
            source,
            np.zeros(len(source), np.int32),
            [pool] * len(seeds),
            seeds,
            batch_size=batch_size,
            num_steps=steps,
            augment_config=augment,
            box=box,
        )
        iterator = to_iterator(dataset, workers=int(self.config.data.workers))
        ckpt = GroupCheckpointer(self.workdir / "checkpoints" / "pretrain", keep=int(self.config.checkpoint.keep))
        spec = program.batch_spec(len(seeds), batch_size, p.input_size, batch_sh)
        step_program = jax.jit(
            jax.vmap(make_pretrain_step(self.spec, tx, p.input_size)),
            donate_argnums=0,
            out_shardings=(lane_sh, lane_sh),
        )
        try:
            state, _, _ = train_loop(
                "pretrain",
                ckpt,
                state,
                step_program,
                keys,
                iterator,
                spec,
                batch_sh=batch_sh,
                steps=steps,
                log_every=int(self.config.log_every),
                save_every=int(p.checkpoint_every),
                progress=self.progress,
            )
            ckpt.wait()
        finally:
            ckpt.close()
        return state

    # ------------------------------------------------------------------------------------------
    def write_outputs(self, state: dict, source, pool: np.ndarray) -> None:
        from pfq.convert.store import save_model_dir
        from pfq.pretrain.export import encoder_variables, save_format_b
        from pfq.pretrain.figures import plot_losses, plot_reconstruction

        p = self.config.pretrain
        seeds = [int(s) for s in p.seeds]
        losses, diverged = to_host(state["losses"]), to_host(state["diverged_step"])
        rows = [
            {"step": s + 1, **{f"loss_seed{seed}": float(losses[i, s]) for i, seed in enumerate(seeds)}}
            for s in range(losses.shape[1])
        ]
        write_csv(self.workdir / "loss.csv", rows)
        plot_losses(losses, seeds, self.workdir / "loss.png")
        healthy = [i for i in range(len(seeds)) if diverged[i] < 0]
        if not healthy:
            raise FloatingPointError(
                f"every pretraining seed diverged (steps {diverged.tolist()}); lower "
                "config.pretrain.lr. Checkpoints are kept in " + str(self.workdir / "checkpoints")
            )
        record = pretrain_record(self.config)
        for i in healthy:
            params = jax.tree.map(lambda x, i=i: to_host(x)[i], state["params"])
            suffix = "" if i == healthy[0] else f"-s{seeds[i]}"
            meta = {
                "source_format": "pfq-fcmae",
                "pretrain_seed": seeds[i],
                "pretrain_steps": int(p.steps),
                "final_loss": float(np.nanmean(losses[i, -max(1, len(losses[i]) // 10) :])),
                "pretrain_config": record,
            }
            save_model_dir(
                self.workdir / f"model{suffix}", self.spec.encoder, encoder_variables(params), meta, overwrite=True
            )
            save_format_b(
                self.workdir / f"fcmae{suffix}.safetensors",
                self.spec,
                params,
                {"pfq_source": "pfq.pretrain", "pretrain_seed": str(seeds[i])},
            )
            if i == healthy[0]:
                plot_reconstruction(
                    self.spec, params, source[int(pool[0])], self.workdir / "reconstruction.png", seed=seeds[i]
                )
        atomic_write_text(
            self.workdir / "run.json",
            json.dumps(
                {"complete": True, "seeds": seeds, "diverged_step": diverged.tolist(), "pool_cases": len(pool)},
                indent=2,
            ),
        )


PRETRAINED_INIT = "fcmae"  # sweep.inits keyword: this config's FCMAE pretraining, run once and cached


def cached_pretraining(config: ConfigDict, progress: bool = True) -> Path:
    """The model directory of this config's pretraining: in `pretrain.dir`, or in a cache folder keyed
    by every field that changes the weights (`pretrain_record`), so a later sweep with the same
    pretraining reuses it; an interrupted pretraining resumes there."""
    import hashlib

    validate_pretrain_config(config)
    record = json.dumps(pretrain_record(config), sort_keys=True)
    workdir = (
        Path(config.pretrain.dir)
        if config.pretrain.get("dir")
        else cache_root() / "pretrain" / hashlib.sha256(record.encode()).hexdigest()[:12]
    )
    return Pretrainer(config, workdir, progress=progress).run()
