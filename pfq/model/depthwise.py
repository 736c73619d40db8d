"""Depthwise 3-D convolution (ConvNeXt's 7x7x7, stride 1, 'SAME' padding) behind one function.

XLA's grouped convolution (`feature_group_count=C`) is correct everywhere but very slow on CPU for
7^3 depthwise kernels (forward+backward measured ~70x slower than PyTorch), so the default on CPU is
an FFT formulation. Every formulation computes the same cross-correlation and is tested against
`direct` for outputs and gradients.

Shapes: x (N, D, H, W, C) channels-last; kernel (kd, kh, kw, 1, C) (Flax depthwise layout); bias (C,).

Formulations (benchmarks/bench_depthwise.py measures them against PyTorch):
  direct      XLA grouped convolution; the reference.
  fft         real FFTs with a hand-written VJP (below); the CPU default.
  fft_autodiff  the first FFT prototype, differentiated by JAX; kept for comparison only.
  shifted     scan over the (depth, row) kernel offsets of shifted, channel-scaled sums, with a
              hand-written VJP; no FFT, no grouped conv. The TPU choice (see resolve_impl).

On this project's 2-core CPU, fft was the fastest at every stage shape of ProFound-Conv tiny
(2.4-5x PyTorch's faster layout; direct 0.02-0.05x, shifted 0.14-0.37x), hence the CPU default.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

DepthwiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[3] != 1 or kernel.shape[4] != x.shape[-1]:
        raise ValueError(
            f"depthwise conv expects x (N,D,H,W,C) and kernel (kd,kh,kw,1,C); got {x.shape} and {kernel.shape}"
        )
    if any(k % 2 == 0 for k in kernel.shape[:3]):
        raise ValueError(f"depthwise conv needs odd kernel sizes for 'SAME' padding, got {kernel.shape[:3]}")


def depthwise_direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA grouped convolution: the reference formulation."""
    pads = [((k - 1) // 2, (k - 1) // 2) for k in kernel.shape[:3]]
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1, 1),
        padding=pads,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )


# --------------------------------------------------------------------------------------------
# FFT formulation with a hand-written VJP.
#
# Along each spatial axis of size n with a kernel of k = 2p+1 taps, take a transform length
# L >= n + p with only factors 2, 3, 5 (FFTs of lengths like 62 = 2*31 are 2-3x slower). Zero-extend
# x to L and place the kernel circularly (tap a at offset a - p mod L). The circular
# cross-correlation then equals the 'SAME' linear one on [0, n): the reads that fall off either
# edge, x[-p..-1] and x[n..n+p-1], wrap into the zero tail [n, L). So no explicit left padding
# and no output shift are needed, and L is smaller than the usual n + 2p.
#
# The same argument makes the adjoints exact: dx is the circular convolution of the
# zero-extended dy with the kernel, and dkernel[a] is the circular cross-correlation of dy with
# x at lag a - p. In frequency terms, with X, DY the spectra and K the kernel's:
#   y = irfft(X * conj(K)),  dx = irfft(DY * K),  dkernel = irfft(sum_batch X * conj(DY))[lags].
# The kernel's spectrum and the 7^3 lags of dkernel are evaluated with small DFT matrices
# (the kernel has only 7 nonzero taps per axis) rather than full-size FFTs: cheaper, and the
# backward needs no complex activations beyond X.
#
# XLA's FFT transforms the innermost axes, so the spectra live channels-first
# (N, C, Ld, Lh, Lw//2+1); the transposes in and out are the price of channels-last activations.
# --------------------------------------------------------------------------------------------


def _smooth_length(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3, 5."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_lengths(spatial: tuple[int, ...], kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """Transform lengths used by the FFT formulation for a (D, H, W) extent."""
    return tuple(_smooth_length(n + (k - 1) // 2) for n, k in zip(spatial, kernel_size, strict=True))


@lru_cache(maxsize=256)
def _phase(length: int, taps: int, bins: int) -> np.ndarray:
    """E[f, a] = exp(+2 pi i f (a - p) / L): spectrum bin f of a unit tap at circular offset a - p."""
    p = (taps - 1) // 2
    f = np.arange(bins)[:, None]
    a = np.arange(taps)[None, :] - p
    return np.exp(2j * np.pi * f * a / length).astype(np.complex64)


def _bmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched matmul over a shared leading axis: (B, m, k) @ (B, k, n) -> (B, m, n)."""
    return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)


def _kernel_partial_spectrum(k: jax.Array, lengths: tuple[int, int, int]) -> jax.Array:
    """Kernel spectrum transformed along W and D only: (kd, kh, kw, C) real -> (C, Ld, kh, Lw//2+1).

    `_times_kernel_spectrum` finishes the H axis inside the product with the input's spectrum, so
    the full kernel spectrum (as large as one sample's spectrum) is never stored.
    """
    (kd, kh, kw), c = k.shape[:3], k.shape[3]
    ld, _, lw = lengths
    wb = lw // 2 + 1
    gd = jnp.asarray(_phase(ld, kd, ld))  # (Ld, kd)
    gw = jnp.asarray(_phase(lw, kw, wb))  # (Wb, kw)
    t = jnp.transpose(k, (3, 0, 1, 2)).astype(jnp.complex64).reshape(c, kd * kh, kw)
    t = _bmm(t, jnp.broadcast_to(gw.T, (c, kw, wb)))  # (C, kd*kh, Wb)
    t = _bmm(jnp.broadcast_to(gd, (c, ld, kd)), t.reshape(c, kd, kh * wb))  # (C, Ld, kh*Wb)
    return t.reshape(c, ld, kh, wb)


def _times_kernel_spectrum(xs: jax.Array, kp: jax.Array, lh: int, conj: bool) -> jax.Array:
    """xs (N, C, Ld, Lh, Wb) times the kernel spectrum (or its conjugate), finishing the H-axis DFT
    of `kp` as kh broadcast multiply-adds that XLA fuses with the product (cheaper than a
    batched complex matmul, and nothing spectrum-sized is materialised for the kernel)."""
    kh = kp.shape[2]
    gh = _phase(lh, kh, lh)  # (Lh, kh)
    if conj:
        kp, gh = jnp.conj(kp), np.conj(gh)
    ksp = sum(kp[:, :, b : b + 1, :] * jnp.asarray(gh[:, b])[None, None, :, None] for b in range(kh))
    return xs * ksp[None]


def _kernel_lags(s: jax.Array, lengths: tuple[int, int, int], ks: tuple[int, int, int]) -> jax.Array:
    """Inverse real 3-D DFT of s (C, Ld, Lh, Lw//2+1), evaluated only at lags -p..p per axis.

    Returns (kd, kh, kw, C) real: the kernel gradient.
    """
    c = s.shape[0]
    ld, lh, lw = lengths
    kd, kh, kw = ks
    wb = lw // 2 + 1
    gd = jnp.asarray(_phase(ld, kd, ld).T / ld)  # (kd, Ld)
    gh = jnp.asarray(_phase(lh, kh, lh).T / lh)  # (kh, Lh)
    # Half-spectrum along W: bins other than DC and Nyquist stand for two conjugate bins.
    wts = np.full(wb, 2.0)
    wts[0] = 1.0
    if lw % 2 == 0:
        wts[-1] = 1.0
    gw = jnp.asarray((_phase(lw, kw, wb) * wts[:, None] / lw).astype(np.complex64))  # (Wb, kw)
    t = _bmm(jnp.broadcast_to(gh, (c * ld, kh, lh)), s.reshape(c * ld, lh, wb))  # (C*Ld, kh, Wb)
    t = _bmm(jnp.broadcast_to(gd, (c, kd, ld)), t.reshape(c, ld, kh * wb))  # (C, kd, kh*Wb)
    t = jnp.real(_bmm(t.reshape(c, kd * kh, wb), jnp.broadcast_to(gw, (c, wb, kw))))  # (C, kd*kh, kw)
    return jnp.transpose(t.reshape(c, kd, kh, kw), (1, 2, 3, 0))


def _spectrum(x: jax.Array, lengths: tuple[int, int, int]) -> jax.Array:
    """(N, D, H, W, C) -> rfft over (D, H, W) of the zero-extended volume, (N, C, Ld, Lh, Lw//2+1)."""
    n = x.shape[1:4]
    xt = jnp.transpose(x.astype(jnp.float32), (0, 4, 1, 2, 3))
    xt = jnp.pad(xt, [(0, 0), (0, 0)] + [(0, lengths[i] - n[i]) for i in range(3)])
    return jnp.fft.rfftn(xt, axes=(2, 3, 4))


def _spatial(s: jax.Array, lengths: tuple[int, int, int], n: tuple[int, ...], dtype) -> jax.Array:
    """Inverse of `_spectrum`: first n[i] samples per axis, back to channels-last."""
    y = jnp.fft.irfftn(s, s=lengths, axes=(2, 3, 4))[:, :, : n[0], : n[1], : n[2]]
    return jnp.transpose(y, (0, 2, 3, 4, 1)).astype(dtype)


@jax.custom_vjp
def depthwise_fft(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Cross-correlation via real FFTs with a hand-written VJP (see the block comment above).

    Computes in float32 whatever the input dtype (bf16 FFTs lose too much precision) and returns
    x.dtype. The backward keeps only x's spectrum and recomputes the kernel's (cheap).
    """
    return _fft_fwd(x, kernel)[0]


def _fft_fwd(x: jax.Array, kernel: jax.Array):
    ks, n = kernel.shape[:3], x.shape[1:4]
    lengths = fft_lengths(n, ks)
    xs = _spectrum(x, lengths)
    kp = _kernel_partial_spectrum(kernel[:, :, :, 0, :].astype(jnp.float32), lengths)
    y = _spatial(_times_kernel_spectrum(xs, kp, lengths[1], conj=False), lengths, n, x.dtype)
    # The spectrum is kept as (re, im) float pairs: same bytes, and jax.checkpoint (0.10) cannot
    # save complex residuals. Named so that a remat policy can choose to keep it (convnext.py).
    saved = checkpoint_name(jnp.stack([jnp.real(xs), jnp.imag(xs)], axis=-1), "dwconv_spectrum")
    # Zero-size arrays carry the dtypes to the backward without holding any memory.
    return y, (saved, kernel, jnp.zeros((0,), x.dtype))


def _fft_bwd(res, dy: jax.Array):
    saved, kernel, xdt = res
    xs = jax.lax.complex(saved[..., 0], saved[..., 1])
    ks, n = kernel.shape[:3], dy.shape[1:4]
    lengths = fft_lengths(n, ks)
    kp = _kernel_partial_spectrum(kernel[:, :, :, 0, :].astype(jnp.float32), lengths)
    dys = _spectrum(dy, lengths)
    dx = _spatial(_times_kernel_spectrum(dys, kp, lengths[1], conj=True), lengths, n, xdt.dtype)
    dk = _kernel_lags(jnp.sum(xs * jnp.conj(dys), axis=0), lengths, ks)
    return dx, dk[:, :, :, None, :].astype(kernel.dtype)


depthwise_fft.defvjp(_fft_fwd, _fft_bwd)


def depthwise_fft_autodiff(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The first FFT prototype (pad by k-1, full-size kernel FFT, JAX autodiff); for comparison."""
    ks = kernel.shape[:3]
    pads = [(0, 0)] + [((k - 1) // 2, (k - 1) // 2) for k in ks] + [(0, 0)]
    xp = jnp.pad(x.astype(jnp.float32), pads)
    lengths = xp.shape[1:4]
    k = kernel[:, :, :, 0, :].astype(jnp.float32)[::-1, ::-1, ::-1]
    xf = jnp.fft.rfftn(xp, s=lengths, axes=(1, 2, 3))
    kf = jnp.fft.rfftn(k, s=lengths, axes=(0, 1, 2))
    y = jnp.fft.irfftn(xf * kf[None], s=lengths, axes=(1, 2, 3))
    d, h, w = x.shape[1:4]
    y = y[:, ks[0] - 1 : ks[0] - 1 + d, ks[1] - 1 : ks[1] - 1 + h, ks[2] - 1 : ks[2] - 1 + w, :]
    return y.astype(x.dtype)


# How many (depth, row) offsets each scan iteration of the shifted formulation does.
SHIFTED_UNROLL: int | bool = 1


def _shifted_sum(x: jax.Array, k: jax.Array) -> jax.Array:
    """'SAME' cross-correlation as kd*kh*kw shifted, channel-scaled copies of x: a scan over the
    kd*kh (depth, row) offsets with the kw column shifts unrolled keeps the compiled program small.
    k: (kd, kh, kw, C)."""
    kd, kh, kw = k.shape[:3]
    pads = [(0, 0)] + [((s - 1) // 2, (s - 1) // 2) for s in (kd, kh, kw)] + [(0, 0)]
    xp = jnp.pad(x, pads)
    d, h, w = x.shape[1:4]
    k = k.astype(x.dtype).reshape(kd * kh, kw, -1)

    def over_offsets(acc, ab):
        rows = jax.lax.dynamic_slice(xp, (0, ab // kh, ab % kh, 0, 0), (x.shape[0], d, h, xp.shape[3], x.shape[4]))
        kab = jax.lax.dynamic_index_in_dim(k, ab, axis=0, keepdims=False)
        for c in range(kw):
            acc = acc + rows[:, :, :, c : c + w, :] * kab[c]
        return acc, None

    acc, _ = jax.lax.scan(over_offsets, jnp.zeros_like(x), jnp.arange(kd * kh), unroll=SHIFTED_UNROLL)
    return acc


@jax.custom_vjp
def depthwise_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Sum of kd*kh*kw shifted, channel-scaled copies: no FFT, no grouped convolution, and only
    elementwise multiply-adds on channels-last data. XLA's CPU code for it is slow, but it is the
    formulation the TPU compiler handles best: one convolution's forward and backward compiled
    ~25x faster than `direct`'s grouped convolution (whose code XLA:TPU makes very long) and needs
    no FFT (BENCHMARKS.md, "Accelerators"). The hand-written VJP keeps only x and the kernel for the
    backward (autodiff through the scan saved every shifted slice: ~300x the activation):
    dx is the same sum over dy with the kernel flipped, and each kernel tap's gradient is a
    reduction of dy times the matching shifted x."""
    return _shifted_sum(x, kernel[:, :, :, 0, :])


def _shifted_fwd(x: jax.Array, kernel: jax.Array):
    return depthwise_shifted(x, kernel), (x, kernel)


def _shifted_bwd(res, dy: jax.Array):
    x, kernel = res
    k = kernel[:, :, :, 0, :]
    dx = _shifted_sum(dy, k[::-1, ::-1, ::-1])
    kd, kh, kw = k.shape[:3]
    pads = [(0, 0)] + [((s - 1) // 2, (s - 1) // 2) for s in (kd, kh, kw)] + [(0, 0)]
    xp = jnp.pad(x, pads)
    d, h, w = x.shape[1:4]
    dyf = dy.astype(jnp.float32)

    def tap_grads(_, ab):
        rows = jax.lax.dynamic_slice(
            xp, (0, ab // kh, ab % kh, 0, 0), (x.shape[0], d, h, xp.shape[3], x.shape[4])
        ).astype(jnp.float32)
        return None, jnp.stack([jnp.sum(rows[:, :, :, c : c + w, :] * dyf, axis=(0, 1, 2, 3)) for c in range(kw)])

    _, dk = jax.lax.scan(tap_grads, None, jnp.arange(kd * kh), unroll=SHIFTED_UNROLL)  # (kd*kh, kw, C)
    return dx.astype(x.dtype), dk.reshape(kd, kh, kw, 1, -1).astype(kernel.dtype)


depthwise_shifted.defvjp(_shifted_fwd, _shifted_bwd)


IMPLEMENTATIONS: dict[str, DepthwiseFn] = {
    "direct": depthwise_direct,
    "fft": depthwise_fft,
    "fft_autodiff": depthwise_fft_autodiff,
    "shifted": depthwise_shifted,
}


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """'auto' picks by backend: FFT on CPU (measured fastest there); shifted sums on TPU, whose
    7x7x7 convolution XLA:TPU compiles ~25x faster than the grouped convolution and ~140x faster
    than the FFT, with the fewest temporaries (compiled ahead of time for a described v5e;
    BENCHMARKS.md, "Accelerators"; run time on a real TPU not measured); XLA's grouped conv (cuDNN)
    on GPU, not measured."""
    if impl != "auto":
        if impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown depthwise implementation {impl!r}; choose from {sorted(IMPLEMENTATIONS)} or 'auto'"
            )
        return impl
    backend = backend or jax.default_backend()
    return {"cpu": "fft", "tpu": "shifted"}.get(backend, "direct")


def depthwise_conv3d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, impl: str = "auto") -> jax.Array:
    """Depthwise 'SAME' cross-correlation, stride 1: torch `Conv3d(C, C, k, padding=k//2, groups=C)`."""
    _check(x, kernel)
    y = IMPLEMENTATIONS[resolve_impl(impl)](x, kernel)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
