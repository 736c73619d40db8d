"""Model structure: shapes and parameter counts for every preset, path names, numerics of parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfq.model import SIZES, ModelSpec, abstract_variables, apply, count_params, features, init_variables
from pfq.model.convnext import GRN, drop_path, gelu


# Encoder parameter counts: 10 values per block-channel pattern, checked against upstream for tiny
# (29,311,680 in docs/checkpoints.md); the others follow the same formula.
def expected_encoder_params(depths, dims, in_chans=3):
    total = dims[0] * in_chans * 64 + dims[0] + 2 * dims[0]  # stem conv + LayerNorm
    for i in (1, 2, 3):
        k3 = 1 if i == 3 else 8
        total += 2 * dims[i - 1] + dims[i] * dims[i - 1] * k3 + dims[i]
    for d, n in zip(depths, dims, strict=True):
        block = (343 * n + n) + 2 * n + (n * 4 * n + 4 * n) + 2 * 4 * n + (4 * n * n + n)
        total += d * block
    return total + 2 * dims[-1]


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts(size):
    depths, dims = SIZES[size]
    variables = abstract_variables(ModelSpec.from_size(size, num_classes=4))
    encoder = count_params(variables["params"]["encoder"])
    assert encoder == expected_encoder_params(depths, dims)
    head = count_params(variables["params"]["head"])
    assert head == dims[-1] * 256 + 256 + 2 * 256 + 256 * 4 + 4
    assert count_params(variables["batch_stats"]) == 512


def test_tiny_matches_upstream_count():
    assert count_params(abstract_variables(ModelSpec.from_size("tiny"))["params"]["encoder"]) == 29_311_680


def test_paths_mirror_state_dict_names():
    params = abstract_variables(ModelSpec.from_size("atto"))["params"]
    enc = params["encoder"]
    assert enc["downsample_layers"][0][0]["kernel"].shape == (4, 4, 4, 3, 40)
    assert enc["downsample_layers"][3][1]["kernel"].shape == (1, 1, 1, 160, 320)  # 1x1x1 stride-1
    assert enc["stages"][2][5]["dwconv"]["kernel"].shape == (7, 7, 7, 1, 160)
    assert enc["stages"][0][1]["grn"]["gamma"].shape == (160,)
    assert params["head"][3]["kernel"].shape == (256, 2)
    assert 2 not in params["head"]  # index 2 is the parameter-free ReLU, as upstream


@pytest.mark.parametrize("size", ["atto", "femto"])
def test_forward_shapes_and_total_stride(size):
    spec = ModelSpec.from_size(size, num_classes=3)
    variables = init_variables(spec, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 32, 48, 3))
    run = jax.jit(apply, static_argnums=0, static_argnames="train")  # op by op takes 10x longer
    logits, stats = run(spec, variables, x, train=True, key=jax.random.key(2))
    assert logits.shape == (2, 3)
    assert jax.eval_shape(lambda v, x: features(spec, v, x), variables, x).shape == (2, spec.embed_dim)
    # Training updates the BatchNorm running statistics; eval leaves them alone.
    assert not np.allclose(stats["head"][1]["mean"], variables["batch_stats"]["head"][1]["mean"])
    _, eval_stats = run(spec, variables, x, train=False)
    np.testing.assert_array_equal(eval_stats["head"][1]["mean"], variables["batch_stats"]["head"][1]["mean"])


def test_grn_matches_definition():
    grn = GRN(4)
    grn.gamma[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
    grn.beta[...] = jnp.array([0.1, 0.2, 0.3, 0.4])
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 3, 4)).astype(np.float32)
    g = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2, 3), keepdims=True))
    n = g / (g.mean(-1, keepdims=True) + 1e-6)
    expected = np.array([0.5, -1.0, 2.0, 0.0]) * (x * n) + np.array([0.1, 0.2, 0.3, 0.4]) + x
    np.testing.assert_allclose(np.asarray(grn(jnp.asarray(x))), expected, atol=1e-5)


def test_gelu_is_the_exact_erf_form_with_its_gradient():
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(gelu))(x), jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=2e-6
    )
    # Not the tanh approximation (0.5 x (1 + tanh(...))): they differ by up to ~5e-4 near |x| = 2.
    assert float(jnp.max(jnp.abs(gelu(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_drop_path_is_identity_without_key_and_scales_kept_samples():
    x = jnp.ones((64, 2, 2, 2, 3))
    assert drop_path(x, 0.5, None) is x
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    kept = y.reshape(64, -1)[:, 0]
    assert np.all((kept == 0) | np.isclose(kept, 1.0 / 0.75))
    assert 0 < (kept == 0).sum() < 64


def test_eval_is_deterministic_and_drop_path_only_in_training():
    spec = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), drop_path_rate=0.5)
    variables = init_variables(spec, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 16, 3))
    run = jax.jit(apply, static_argnums=0, static_argnames="train")  # op by op takes 10x longer
    a, _ = run(spec, variables, x, train=False, key=jax.random.key(5))
    b, _ = run(spec, variables, x, train=False, key=jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    c, _ = run(spec, variables, x, train=True, key=jax.random.key(5))
    d, _ = run(spec, variables, x, train=True, key=jax.random.key(6))
    assert not np.allclose(c, d)
