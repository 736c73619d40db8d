"""Every depthwise formulation against a float64 NumPy reference and against `direct`, for the
output and for the gradients with respect to the input and the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfq.model.depthwise import IMPLEMENTATIONS, depthwise_conv3d, fft_lengths, resolve_impl

TOL = 1e-5  # max abs difference, fp32, on O(1) values (see _case)

# (N, D, H, W, C), kernel size: odd extents, extents below the kernel size, a single voxel,
# C not a multiple of 8, N > 1.
SHAPES = [
    ((1, 5, 6, 7, 3), (7, 7, 7)),
    ((2, 4, 9, 5, 13), (7, 7, 7)),
    ((3, 8, 7, 8, 10), (7, 7, 7)),
    ((1, 1, 1, 1, 4), (7, 7, 7)),
    ((2, 3, 2, 11, 5), (7, 7, 7)),
    ((2, 6, 5, 9, 6), (3, 5, 7)),
]


def _case(shape, ks, seed=0):
    """Input ~ N(0,1), kernel ~ 0.05 N(0,1) (init-like), cotangent scaled by 1/sqrt(N*D*H*W) so the
    output and both gradients are O(1) and an absolute tolerance of 1e-5 means ~1e-5 relative."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    k = (0.05 * rng.standard_normal((*ks, 1, shape[-1]))).astype(np.float32)
    g = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:4]))).astype(np.float32)
    return x, k, g


def _reference(x, k, g):
    """float64 direct evaluation: y, dL/dx, dL/dk for L = sum(y * g)."""
    x, k, g = (a.astype(np.float64) for a in (x, k, g))
    ks = k.shape[:3]
    p = [(s - 1) // 2 for s in ks]
    n = x.shape[1:4]
    xp = np.pad(x, [(0, 0)] + [(q, q) for q in p] + [(0, 0)])
    gp = np.pad(g, [(0, 0)] + [(q, q) for q in p] + [(0, 0)])
    y = np.zeros_like(x)
    dx = np.zeros_like(x)
    dk = np.zeros_like(k)
    for a in range(ks[0]):
        for b in range(ks[1]):
            for c in range(ks[2]):
                w = k[a, b, c, 0]
                win = xp[:, a : a + n[0], b : b + n[1], c : c + n[2], :]
                y += win * w
                dk[a, b, c, 0] = np.sum(win * g, axis=(0, 1, 2, 3))
                # y[i] reads x[i + a - p]: so x[j] receives g[j - a + p] * w
                dx += (
                    gp[
                        :,
                        2 * p[0] - a : 2 * p[0] - a + n[0],
                        2 * p[1] - b : 2 * p[1] - b + n[1],
                        2 * p[2] - c : 2 * p[2] - c + n[2],
                        :,
                    ]
                    * w
                )
    return y, dx, dk


def _value_and_grads(impl, x, k, g):
    """One jitted computation (eager dispatch op by op is slower than compiling once)."""

    @jax.jit
    def run(x, k, g):
        y, vjp = jax.vjp(lambda x, k: depthwise_conv3d(x, k, impl=impl), x, k)
        return (y, *vjp(g))

    return tuple(np.asarray(a) for a in run(x, k, g))


@pytest.mark.parametrize("shape,ks", SHAPES)
def test_formulations_match_float64_reference_and_direct(shape, ks):
    x, k, g = _case(shape, ks)
    ref = _reference(x, k, g)
    direct = _value_and_grads("direct", x, k, g)
    for impl in IMPLEMENTATIONS:
        got = _value_and_grads(impl, x, k, g)
        for name, a, r, d in zip(("y", "dx", "dkernel"), got, ref, direct, strict=True):
            assert a.shape == r.shape, (impl, name)
            assert np.max(np.abs(a - r)) <= TOL, (impl, name, float(np.max(np.abs(a - r))))
            assert np.max(np.abs(a - d)) <= TOL, (impl, name, float(np.max(np.abs(a - d))))


def test_bias_and_jit():
    x, k, _ = _case((2, 5, 6, 7, 3), (7, 7, 7))
    bias = np.array([0.5, -1.0, 2.0], np.float32)
    for impl in IMPLEMENTATIONS:
        y = jax.jit(lambda x, k, b, impl=impl: depthwise_conv3d(x, k, b, impl=impl))(x, k, bias)
        np.testing.assert_allclose(y, _reference(x, k, np.zeros_like(x))[0] + bias, atol=TOL)


@pytest.mark.parametrize("impl", ["fft", "shifted"])
def test_hand_written_vjp_under_vmap_of_grad_matches_loop(impl):
    """The trainer vmaps lanes over the step; the hand-written VJPs must batch correctly."""
    xs, ks, gs = zip(*(_case((1, 4, 5, 6, 3), (7, 7, 7), seed=s) for s in range(3)), strict=True)
    xs, ks, gs = np.stack(xs), np.stack(ks), np.stack(gs)
    grad = jax.grad(lambda x, k, g: jnp.sum(depthwise_conv3d(x, k, impl=impl) * g), argnums=(0, 1))
    vx, vk = jax.jit(jax.vmap(grad))(xs, ks, gs)
    for i in range(3):
        _, dx, dk = _reference(xs[i], ks[i], gs[i])
        assert np.max(np.abs(vx[i] - dx)) <= TOL and np.max(np.abs(vk[i] - dk)) <= TOL


def test_shifted_backward_keeps_only_its_inputs():
    """Autodiff through the shifted scan saved every shifted slice (~300x the activation); the
    hand-written VJP keeps x and the kernel, so the gradient's temporaries stay a few activations."""
    shape = (1, 8, 8, 8, 16)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    k = jax.ShapeDtypeStruct((7, 7, 7, 1, 16), jnp.float32)
    grad = jax.grad(lambda x, k: jnp.sum(depthwise_conv3d(x, k, impl="shifted") ** 2), argnums=(0, 1))
    temp = jax.jit(grad).lower(x, k).compile().memory_analysis().temp_size_in_bytes
    assert temp < 20 * np.prod(shape) * 4, temp


def test_fft_bfloat16_input_keeps_dtype_and_accuracy():
    x, k, g = _case((1, 6, 7, 8, 5), (7, 7, 7))
    xb = jnp.asarray(x, jnp.bfloat16)
    y = jax.jit(lambda x, k: depthwise_conv3d(x, k, impl="fft"))(xb, jnp.asarray(k, jnp.bfloat16))
    dx = jax.jit(jax.grad(lambda x: jnp.sum(depthwise_conv3d(x, k, impl="fft").astype(jnp.float32) * g)))(xb)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    ref = _reference(np.asarray(xb, np.float32), np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32), g)
    assert np.max(np.abs(np.asarray(y, np.float32) - ref[0])) < 2e-2  # bf16 has 8 mantissa bits


def test_fft_lengths_are_smooth_and_long_enough():
    for n in range(1, 80):
        (length,) = fft_lengths((n,), (7,))
        assert length >= n + 3
        r = length
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1
    assert fft_lengths((16, 56, 56), (7, 7, 7)) == (20, 60, 60)


def test_resolve_impl():
    assert resolve_impl("auto", backend="cpu") == "fft"
    assert resolve_impl("auto", backend="gpu") == "direct"
    assert resolve_impl("auto", backend="tpu") == "shifted"
    assert resolve_impl("auto") == resolve_impl("auto", backend=jax.default_backend())
    for impl in IMPLEMENTATIONS:
        assert resolve_impl(impl) == impl
    with pytest.raises(ValueError, match="unknown depthwise"):
        resolve_impl("winograd")


@pytest.mark.parametrize(
    "xs,kshape",
    [
        ((2, 4, 4, 4), (7, 7, 7, 1, 4)),  # x not 5-D
        ((1, 4, 4, 4, 4), (7, 7, 7, 4)),  # kernel not 5-D
        ((1, 4, 4, 4, 4), (7, 7, 7, 1, 3)),  # channel mismatch
        ((1, 4, 4, 4, 4), (7, 7, 7, 2, 4)),  # not depthwise
        ((1, 4, 4, 4, 4), (6, 7, 7, 1, 4)),  # even kernel: no 'SAME' centre
    ],
)
def test_bad_shapes_raise(xs, kshape):
    with pytest.raises(ValueError):
        depthwise_conv3d(jnp.zeros(xs), jnp.zeros(kshape))
