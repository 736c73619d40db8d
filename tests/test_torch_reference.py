"""tests/torch_reference.py against pfq: the same variables give the same logits.

The reference is written from the spec, not from pfq, so agreement here checks both (and the
`load_pfq_variables` mapping the benchmarks rely on)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from pfq.model import ModelSpec, abstract_variables, apply
from tests.torch_reference import build, load_pfq_variables


def _random_variables(spec: ModelSpec, seed: int) -> dict:
    """Random values for every pfq variable, drawn from `abstract_variables` (pfq's own init is a
    slow jit here, and leaves GRN gamma/beta and BN statistics at 0/1, which would hide a mix-up)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s: jax.ShapeDtypeStruct) -> np.ndarray:
        name = str(path[-1].key)
        noise = rng.standard_normal(s.shape)
        if name == "var":
            a = 0.5 + rng.random(s.shape)
        elif name in ("gamma", "beta"):
            a = 0.3 * noise
        elif name == "scale":
            a = 1.0 + 0.2 * noise
        elif name in ("bias", "mean"):
            a = 0.1 * noise
        else:  # kernels, scaled by fan-in
            a = noise / np.sqrt(np.prod(s.shape[:-1]))
        return a.astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_variables(spec))


@pytest.fixture(scope="module")
def pair():
    spec = ModelSpec.from_size("atto", num_classes=2)
    variables = _random_variables(spec, seed=0)
    model = build(spec.depths, spec.dims, spec.in_chans, spec.num_classes)
    load_pfq_variables(model, variables)
    return spec, variables, model


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
    spec, variables, _ = pair
    model = build(spec.depths, spec.dims, spec.in_chans, spec.num_classes)
    load_pfq_variables(model, variables)
    x = np.random.default_rng(2).standard_normal((1, 16, 16, 16, 3)).astype(np.float32)
    logits, stats = jax.jit(lambda v, x: apply(spec, v, x, train=True, key=jax.random.key(0)))(variables, x)
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
