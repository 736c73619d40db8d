"""Model numerics options: per-stage remat gives the same gradients; bf16 compute trains."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfq.model import ModelSpec, apply, init_variables

# A small network with every layer kind (a block per stage): compiles in seconds.
SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=2)


def _batch(n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16, 32, 32, 3)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3, 4)) > 0).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _loss(spec: ModelSpec):
    def loss(params, stats, x, y, key):
        logits, _ = apply(spec, {"params": params, "batch_stats": stats}, x, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    return loss


def test_remat_modes_give_the_same_gradients():
    x, y = _batch()
    key = jax.random.key(3)  # drop-path masks must match too
    v = init_variables(ModelSpec(**SMALL), jax.random.key(0))  # remat does not change parameters
    grads = {}
    # One mixed setting exercises every mode (bool and string spellings) in one compile.
    for remat in [(False,) * 4, ("full", "light", "none", True)]:
        spec = ModelSpec(**SMALL, drop_path_rate=0.2, remat_stages=remat)
        grads[remat] = jax.jit(jax.value_and_grad(_loss(spec)))(v["params"], v["batch_stats"], x, y, key)
    (ref_loss, ref_grads), (loss, g) = grads.values()
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_remat_mode_raises():
    with pytest.raises(ValueError, match="remat"):
        init_variables(ModelSpec(**SMALL, remat_stages=("some",) * 4), jax.random.key(0))


def _primitive_dtypes(jaxpr) -> collections.Counter:
    """(primitive, input dtypes) counts over a jaxpr and its sub-jaxprs."""
    out: collections.Counter = collections.Counter()

    def walk(j):
        for e in j.eqns:
            out[(e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars if hasattr(v, "aval")))] += 1
            for p in e.params.values():
                sub = getattr(p, "jaxpr", p)
                if hasattr(sub, "eqns"):
                    walk(sub)

    walk(jaxpr)
    return out


def test_bf16_computes_in_bf16_where_intended():
    spec = ModelSpec(**SMALL, dtype="bfloat16")
    v = jax.eval_shape(lambda: init_variables(spec, jax.random.key(0)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v)), "parameters stay float32"
    x, _ = _batch()
    jaxpr = jax.make_jaxpr(lambda v, x: apply(spec, v, x, train=True)[0])(v, x).jaxpr
    counts = _primitive_dtypes(jaxpr)
    # the stem/downsample patch convs (matmuls, see PatchConv) and the block pointwise convs run in bf16 ...
    assert counts[("dot_general", ("bfloat16", "bfloat16"))] == 4 + 2 * sum(SMALL["depths"])
    # ... the head's two Linear layers in f32, and every reduction (LayerNorm, GRN and pooling
    # statistics) in f32.
    assert counts[("dot_general", ("float32", "float32"))] == 2
    assert not any(p == "reduce_sum" and "bfloat16" in d for (p, d) in counts)
    out = jax.eval_shape(lambda v, x: apply(spec, v, x, train=True)[0], v, x)
    assert out.dtype == jnp.float32


def test_bf16_model_trains():
    """bf16 compute with fp32 parameters and AdamW state learns a separable toy task."""
    spec = ModelSpec(**SMALL, dtype="bfloat16")
    v = init_variables(ModelSpec(**SMALL), jax.random.key(0))
    x, y = _batch(n=8, seed=1)
    tx = optax.adamw(3e-3, weight_decay=0.05)
    loss_fn = _loss(spec)

    @jax.jit
    def step(params, stats, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, stats, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = v["params"], tx.init(v["params"])
    assert all(
        leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(opt_state) if hasattr(leaf, "dtype") and leaf.ndim > 0
    )
    losses = []
    for i in range(25):
        params, opt_state, loss = step(params, v["batch_stats"], opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_entry_points_set_memory_frugal_cpu_scheduler_unless_user_chose():
    """The command-line entry points pick XLA:CPU's depth-first scheduler (BENCHMARKS.md: 2.2 vs
    3.0 GB of temporaries at the real size) but leave a user's own setting of the flag alone;
    importing pfq as a library changes nothing in the environment."""
    import os
    import subprocess
    import sys

    import pfq

    root = os.path.dirname(os.path.dirname(pfq.__file__))  # this checkout's pfq, not an installed one
    code = (
        "import os, pfq, pfq.train.trainer, pfq.predict; before = os.environ['XLA_FLAGS']; "
        "from pfq import xla_flags; xla_flags.set_defaults(); print(before); print(os.environ['XLA_FLAGS'])"
    )
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    for given, expected in [
        ("", f"{flag}=false"),
        ("--xla_dump_to=/tmp/x", f"--xla_dump_to=/tmp/x {flag}=false"),
        (f"{flag}=true", f"{flag}=true"),
    ]:
        env = dict(os.environ, XLA_FLAGS=given, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == [given, expected]


def test_cpu_scheduler_flag_is_left_out_where_xla_lacks_it(monkeypatch):
    """XLA aborts on an unknown XLA_FLAGS entry, so a flag the installed jaxlib does not define
    (a future XLA may drop this one) is never set."""
    import os

    from pfq import xla_flags

    assert xla_flags.xla_defines_flag(xla_flags.CPU_SCHEDULER_FLAG)  # the installed jaxlib has it
    assert not xla_flags.xla_defines_flag("--xla_cpu_flag_no_xla_has_ever_had")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setattr(xla_flags, "xla_defines_flag", lambda flag: False)
    xla_flags.set_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
