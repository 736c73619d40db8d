"""Lanes: vmapped lanes train exactly like the same runs one by one; meshes; divergence freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from pfq.config import base_config
from pfq.model import ModelSpec, init_variables
from pfq.train.lanes import group_lanes, make_lanes, make_mesh
from pfq.train.optim import make_optimizer
from pfq.train.step import init_state, make_train_step

SPEC = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=2, drop_path_rate=0.1, depthwise_impl="direct")
OPTIM = base_config().optim
OPTIM.update({"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 1, "grad_clip": 1.0, "layer_decay": 0.8})


def _batches(lanes, steps, batch=2, shape=(16, 16, 16, 3)):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(lanes, batch) + shape).astype(np.float32),
            "label": rng.integers(0, 2, size=(lanes, batch)).astype(np.int32),
        }
        for _ in range(steps)
    ]


def test_vmapped_lanes_equal_sequential_runs():
    seeds, steps = [3, 7], 3
    variables = [init_variables(SPEC, jax.random.key(s)) for s in seeds]
    tx = make_optimizer(OPTIM, variables[0]["params"], SPEC.depths, steps)
    step = make_train_step(SPEC, tx)
    keys = [jax.random.key(100 + s) for s in seeds]
    batches = _batches(len(seeds), steps)

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_state(v, tx) for v in variables])
    vstep = jax.jit(jax.vmap(step))
    vlosses = []
    for b in batches:
        stacked, m = vstep(stacked, b, jnp.stack(keys))
        vlosses.append(np.asarray(m["loss"]))

    sstep = jax.jit(step)
    for lane, v in enumerate(variables):
        state = init_state(v, tx)
        for t, b in enumerate(batches):
            state, m = sstep(state, jax.tree.map(lambda x, lane=lane: x[lane], b), keys[lane])
            np.testing.assert_allclose(m["loss"], vlosses[t][lane], atol=1e-5)
        lane_params = jax.tree.map(lambda x, lane=lane: x[lane], stacked["params"])
        flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
        for (path, a), b in zip(flat, jax.tree.leaves(lane_params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert np.isfinite(np.stack(vlosses)).all()
    # The lanes really differ (different seeds and data), so the comparison is not vacuous.
    assert not np.allclose(vlosses[-1][0], vlosses[-1][1])


def test_non_finite_loss_freezes_only_that_lane():
    variables = [init_variables(SPEC, jax.random.key(s)) for s in (0, 1)]
    tx = optax.sgd(0.1)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_state(v, tx) for v in variables])
    batch = _batches(2, 1)[0]
    batch["image"][1, 0, 0, 0, 0, 0] = np.nan
    new, _ = jax.jit(jax.vmap(make_train_step(SPEC, tx)))(stacked, batch, jnp.stack([jax.random.key(0)] * 2))
    assert list(np.asarray(new["diverged_step"])) == [-1, 0]
    frozen = jax.tree.leaves(jax.tree.map(lambda x: x[1], new["params"]))
    before = jax.tree.leaves(jax.tree.map(lambda x: x[1], stacked["params"]))
    assert all(np.array_equal(a, b) for a, b in zip(frozen, before, strict=True))
    moved = jax.tree.leaves(jax.tree.map(lambda x: x[0], new["params"]))
    start = jax.tree.leaves(jax.tree.map(lambda x: x[0], stacked["params"]))
    assert any(not np.array_equal(a, b) for a, b in zip(moved, start, strict=True))


def test_lane_grid_and_groups():
    lanes = make_lanes((0.0, 1.0), ("scratch", "/ckpt"), (10, 20), (0, 1, 2))
    assert len(lanes) == 2 * 2 * 2 * 3
    assert [lane.index for lane in lanes] == list(range(len(lanes)))
    assert [len(g) for g in group_lanes(lanes)] == [12, 12]
    with pytest.raises(ValueError, match="outside"):
        make_lanes((1.5,), ("scratch",), (10,), (0,))


def test_mesh_uses_lane_axis_first():
    devices = list(range(8))  # make_mesh only reshapes the list; fake entries are enough
    assert make_mesh(8, 4, devices).devices.shape == (8, 1)
    assert make_mesh(2, 4, devices).devices.shape == (2, 4)
    assert make_mesh(3, 2, devices).devices.shape == (1, 2)


def test_linear_probe_freezes_the_encoder_and_layer_decay_scales_by_depth():
    from flax import traverse_util

    from pfq.train.optim import lr_scales

    variables = init_variables(SPEC, jax.random.key(0))
    probe = ConfigDict(OPTIM)
    probe.update({"mode": "linear_probe", "layer_decay": 1.0})
    tx = make_optimizer(probe, variables["params"], SPEC.depths, 10)
    step, state = jax.jit(make_train_step(SPEC, tx)), init_state(variables, tx)
    for batch in _batches(1, 2):  # two steps: the warm-up's first learning rate is 0
        state, _ = step(state, jax.tree.map(lambda x: x[0], batch), jax.random.key(0))
    for a, b in zip(
        jax.tree.leaves(state["params"]["encoder"]), jax.tree.leaves(variables["params"]["encoder"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(state["params"]["head"][3]["kernel"], variables["params"]["head"][3]["kernel"])

    scales = traverse_util.flatten_dict(lr_scales(variables["params"], SPEC.depths, 0.5))
    assert scales[("head", 3, "kernel")] == 1.0
    assert scales[("encoder", "downsample_layers", 0, 0, "kernel")] == 0.5**13  # the stem: deepest decay
    assert scales[("encoder", "stages", 0, 0, "dwconv", "kernel")] == 0.5**12
