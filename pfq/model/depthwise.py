"""Depthwise 3-D convolution (ConvNeXt's 7x7x7, stride 1, 'SAME' padding) behind one function.

XLA's grouped convolution (`feature_group_count=C`) is correct everywhere but very slow on CPU for
7^3 depthwise kernels (forward+backward measured ~70x slower than PyTorch), so the default on CPU is
an FFT formulation. Every formulation computes the same cross-correlation and is tested against
`direct` for outputs and gradients.

Shapes: x (N, D, H, W, C) channels-last; kernel (kd, kh, kw, 1, C) (Flax depthwise layout); bias (C,).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

DepthwiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[3] != 1 or kernel.shape[4] != x.shape[-1]:
        raise ValueError(f"depthwise conv expects x (N,D,H,W,C) and kernel (kd,kh,kw,1,C); "
                         f"got {x.shape} and {kernel.shape}")
    if any(k % 2 == 0 for k in kernel.shape[:3]):
        raise ValueError(f"depthwise conv needs odd kernel sizes for 'SAME' padding, got {kernel.shape[:3]}")


def depthwise_direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA grouped convolution: the reference formulation."""
    pads = [((k - 1) // 2, (k - 1) // 2) for k in kernel.shape[:3]]
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(1, 1, 1), padding=pads,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST)


def depthwise_fft(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Cross-correlation via real FFTs over (D, H, W) of the zero-padded input.

    With the input padded by p = (k-1)/2 on each side to length L = n + 2p and the kernel flipped,
    the circular convolution of length L equals the linear one on indices [k-1, L), which are
    exactly the n 'SAME' outputs; the wrapped-around part is discarded.
    """
    ks = kernel.shape[:3]
    pads = [(0, 0)] + [((k - 1) // 2, (k - 1) // 2) for k in ks] + [(0, 0)]
    xp = jnp.pad(x.astype(jnp.float32), pads)
    lengths = xp.shape[1:4]
    k = kernel[:, :, :, 0, :].astype(jnp.float32)[::-1, ::-1, ::-1]
    xf = jnp.fft.rfftn(xp, s=lengths, axes=(1, 2, 3))
    kf = jnp.fft.rfftn(k, s=lengths, axes=(0, 1, 2))
    y = jnp.fft.irfftn(xf * kf[None], s=lengths, axes=(1, 2, 3))
    d, h, w = x.shape[1:4]
    y = y[:, ks[0] - 1:ks[0] - 1 + d, ks[1] - 1:ks[1] - 1 + h, ks[2] - 1:ks[2] - 1 + w, :]
    return y.astype(x.dtype)


def depthwise_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Sum of kd*kh*kw shifted, channel-scaled copies: cheap to compile for small kernels and
    memory-light; a fallback on backends where FFTs are slow."""
    kd, kh, kw = kernel.shape[:3]
    pads = [(0, 0)] + [((k - 1) // 2, (k - 1) // 2) for k in (kd, kh, kw)] + [(0, 0)]
    xp = jnp.pad(x, pads)
    d, h, w = x.shape[1:4]
    k = kernel[:, :, :, 0, :].astype(x.dtype)

    def over_depth(acc, a):
        plane = jax.lax.dynamic_slice_in_dim(xp, a, d, axis=1)
        ka = jax.lax.dynamic_index_in_dim(k, a, axis=0, keepdims=False)
        for b in range(kh):
            for c in range(kw):
                acc = acc + plane[:, :, b:b + h, c:c + w, :] * ka[b, c]
        return acc, None

    acc, _ = jax.lax.scan(over_depth, jnp.zeros_like(x), jnp.arange(kd))
    return acc


IMPLEMENTATIONS: dict[str, DepthwiseFn] = {
    "direct": depthwise_direct,
    "fft": depthwise_fft,
    "shifted": depthwise_shifted,
}


def resolve_impl(impl: str) -> str:
    """'auto' picks by backend: FFT on CPU (measured fastest there), XLA's grouped conv on GPU/TPU,
    where cuDNN and the TPU compiler have native depthwise kernels."""
    if impl != "auto":
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown depthwise implementation {impl!r}; choose from "
                             f"{sorted(IMPLEMENTATIONS)} or 'auto'")
        return impl
    return "fft" if jax.default_backend() == "cpu" else "direct"


def depthwise_conv3d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                     impl: str = "auto") -> jax.Array:
    """Depthwise 'SAME' cross-correlation with stride 1, as torch `Conv3d(C, C, k, padding=k//2, groups=C)`."""
    _check(x, kernel)
    y = IMPLEMENTATIONS[resolve_impl(impl)](x, kernel)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
