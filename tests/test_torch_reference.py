"""tests/torch_reference.py against pfq: the same weights give the same logits, also in the batch-1
training forward the benchmarks time.

The reference is written from the spec, not from pfq; weights cross over with pfq's own converter
(`import_state`), which tests/test_convert.py checks against the same reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from pfq.convert.layout import import_state
from pfq.model import ModelSpec, apply
from tests.torch_reference import build, randomize


def _pair(seed: int = 0):
    """A randomised reference classifier and pfq variables with the same values."""
    spec = ModelSpec.from_size("atto", num_classes=2)
    model = randomize(build(spec.depths, spec.dims, spec.in_chans, spec.num_classes), seed)
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return spec, import_state(spec, state, with_head=True), model


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _ncdhw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def test_eval_logits_match_pfq(pair):
    spec, variables, model = pair
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 16, 3)).astype(np.float32)
    logits = jax.jit(lambda v, x: apply(spec, v, x)[0])(variables, x)
    with torch.no_grad():
        ref = model.eval()(_ncdhw(x)).numpy()
    assert np.abs(ref).max() > 1e-2  # not trivially zero
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)


def test_batch1_training_step_matches_pfq(pair):
    """The benchmark's batch-1 training forward: BatchNorm1dAnyBatch trains where torch's raises,
    and gives pfq's logits and updated statistics."""
    spec, variables, model = _pair()  # a fresh copy: this test updates its BN statistics
    x = np.random.default_rng(2).standard_normal((1, 16, 16, 16, 3)).astype(np.float32)
    logits, stats = jax.jit(lambda v, x: apply(spec, v, x, train=True, key=jax.random.key(0)))(variables, x)
    jax.block_until_ready((logits, stats))  # before torch updates its statistics in place
    ref = model.train()(_ncdhw(x))
    ref.sum().backward()  # the step's backward runs too
    np.testing.assert_allclose(np.asarray(logits), ref.detach().numpy(), rtol=1e-4, atol=1e-4)
    bn = model.head[1]
    np.testing.assert_allclose(np.asarray(stats["head"][1]["mean"]), bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["head"][1]["var"]), bn.running_var.numpy(), rtol=1e-4, atol=1e-5)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = build((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, drop_path_rate=0.9)
    assert model.encoder.stages[0][0].drop_path_rate == 0.0
    assert model.encoder.stages[3][0].drop_path_rate == pytest.approx(0.9)
    x = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        outs = [model(x) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_import_state_never_aliases_the_callers_buffers():
    """A torch model's in-place updates (BN statistics in training) must not reach pfq variables;
    JAX on CPU would otherwise read the torch buffers zero-copy (this test's CI failure)."""
    spec, variables, model = _pair()
    before = [np.array(leaf) for leaf in jax.tree.leaves(variables)]
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    after = [np.array(leaf) for leaf in jax.tree.leaves(variables)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
