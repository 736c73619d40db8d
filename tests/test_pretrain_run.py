"""FCMAE pretraining as a run: the step learns, the CLI writes its outputs, a kill resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from scipy import ndimage

from pfq.config import base_config
from pfq.model import ModelSpec
from pfq.pretrain import model as M
from pfq.pretrain.step import decay_mask, make_pretrain_step, make_tx, pretrain_init_state

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "pretrain_smoke.py")


def _smooth_volumes(n: int, shape=(16, 32, 32, 3), seed: int = 0) -> np.ndarray:
    """Learnable structure: smoothed noise, so masked patches are predictable from their neighbours."""
    rng = np.random.default_rng(seed)
    vols = ndimage.gaussian_filter(rng.standard_normal((n,) + shape), sigma=(0, 3, 3, 3, 0))
    return (vols / vols.std()).astype(np.float32)


def test_weight_decay_follows_upstreams_rule():
    spec = M.FCMAESpec(ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), decoder_dim=16)
    mask = decay_mask(M.init_params(spec, jax.random.key(0)))
    assert mask["mask_token"] and mask["encoder"]["stages"][0][0]["grn"]["gamma"]
    assert mask["decoder"][0]["pwconv1"]["kernel"] and mask["pred"]["kernel"]
    assert not mask["encoder"]["stages"][0][0]["pwconv1"]["bias"] and not mask["decoder"][0]["norm"]["scale"]


def test_loss_falls_on_a_tiny_pool():
    """Below 1 means better than predicting each masked patch's mean (the norm-pix loss of a zero
    prediction is (n-1)/n); measured: 1.0 -> 0.86-0.90 in 60 steps with pfq's init."""
    spec = M.FCMAESpec(ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), decoder_dim=16, init="trunc002")
    config = ConfigDict({"lr": 3e-3, "weight_decay": 0.05, "warmup_steps": 5, "b2": 0.95})
    steps = 60
    params = M.init_params(spec, jax.random.key(0))
    tx = make_tx(config, params, spec, steps)
    state = pretrain_init_state(params, tx, steps)
    step = jax.jit(make_pretrain_step(spec, tx, (16, 32, 32)))
    batch = {"image": jnp.asarray(_smooth_volumes(2)), "label": jnp.zeros(2, jnp.int32)}
    for _ in range(steps):
        state, _ = step(state, batch, jax.random.key(1))
    losses = np.asarray(state["losses"])
    assert int(state["diverged_step"]) == -1 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.95 and losses[-10:].mean() < losses[:5].mean() - 0.05, losses


def _pretrain(workdir: Path, *args: str, env_extra: dict | None = None, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PFQ_CACHE": str(cache), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pfq.pretrain", "--config", SMOKE, "--workdir", str(workdir), "--progress=false", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


def test_bad_pretrain_config_is_refused_before_anything_is_written(tmp_path):
    proc = _pretrain(tmp_path / "w", "--config.pretrain.input_size=(16,24,32)", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.pretrain" in proc.stderr and "multiple of the patch size" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_quality_filter_needs_a_quality_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,t2w,highb,adc\n")
    proc = _pretrain(
        tmp_path / "w",
        f"--config.pretrain.manifest={manifest}",
        "--config.pretrain.quality=hq",
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "quality" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_pretrain_cli_outputs_and_kill_resume_identity(tmp_path):
    """An uninterrupted run and one SIGKILLed after step 5 (checkpoints every 2 steps: Orbax finishes the
    step-2 save before starting the step-4 one, so at least step 2 is committed) then rerun end with the same
    weights, loss curve and format-B export; the export converts back to the model directory's encoder."""
    from safetensors.numpy import load_file

    from pfq.convert import load_model_dir

    cache = tmp_path / "cache"
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _pretrain(full, "--config.pretrain.checkpoint_every=2", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model", "fcmae.safetensors", "loss.csv", "loss.png", "reconstruction.png", "run.json"):
        assert (full / name).exists(), name
    every = "--config.pretrain.checkpoint_every=2"
    proc = _pretrain(cut, every, env_extra={"PFQ_FAULT_POINT": "train_step:5"}, cache=cache)
    assert proc.returncode == -9 and "kill at train_step:5" in proc.stderr
    proc = _pretrain(cut, every, cache=cache)
    assert proc.returncode == 0 and ("resumed from step 2" in proc.stderr or "resumed from step 4" in proc.stderr), (
        proc.stderr[-3000:]
    )
    assert (cut / "loss.csv").read_bytes() == (full / "loss.csv").read_bytes()
    a, b = load_file(str(full / "fcmae.safetensors")), load_file(str(cut / "fcmae.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    converted = tmp_path / "converted"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(full / "fcmae.safetensors"), str(converted)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    _, x, _ = load_model_dir(converted)
    _, y, meta = load_model_dir(full / "model")
    assert meta["source_format"] == "pfq-fcmae"
    jax.tree.map(np.testing.assert_array_equal, x["params"], y["params"])
    # A second run in the same workdir finds the finished pretraining and changes nothing.
    before = (full / "model" / "pfq_model.json").read_bytes()
    proc = _pretrain(full, "--config.pretrain.checkpoint_every=2", cache=cache)
    assert proc.returncode == 0 and "already holds this pretraining" in proc.stderr
    assert (full / "model" / "pfq_model.json").read_bytes() == before


def test_pretrain_section_has_upstream_defaults():
    p = base_config().pretrain
    assert (p.mask_ratio, p.b2, p.weight_decay, p.grn_stats, p.init, p.norm_pix_loss) == (
        0.6,
        0.95,
        0.05,
        "batch",
        "upstream",
        True,
    )


@pytest.mark.slow
def test_sweep_with_the_fcmae_init_pretrains_then_finetunes_both(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PFQ_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "pfq.train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), "--progress=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "w" / "results.csv")))
    assert {r["init"] for r in rows} == {"fcmae", "scratch"}
    assert all(r["status"] == "ok" for r in rows)
    assert list((tmp_path / "cache" / "pretrain").glob("*/model/pfq_model.json"))


def test_a_bad_pretrain_section_stops_a_sweep_that_pretrains(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PFQ_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfq.train",
            "--config",
            SMOKE,
            "--workdir",
            str(tmp_path / "w"),
            "--config.pretrain.grn_stats=global",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 2 and "invalid config" in proc.stderr and "grn_stats" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()
