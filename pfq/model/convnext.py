"""ProFound-Conv: a 3-D ConvNeXt-V2 encoder and the ProFound classifier head, in Flax NNX.

Attribute paths mirror the upstream PyTorch state-dict names, so `encoder.stages.2.4.dwconv.kernel`
here is `encoder.stages.2.4.dwconv.weight` there; weight conversion is a walk over paths
(see `pfq.convert`). Input is channels-last (N, D, H, W, C); the numeric definitions (eps, exact-erf
GELU, GRN, 1x1x1 stride-1 last downsample) follow docs/checkpoints.md ("Numeric definitions").
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pfq.model.depthwise import depthwise_conv3d

# name -> (depths, dims); upstream presets. ProFound itself uses "tiny".
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
HEAD_HIDDEN = 256
LN_EPS = 1e-6
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax weight on the old value == torch momentum 0.1

# What each remat mode keeps for the backward (names set in Block.__call__ and depthwise.py).
REMAT_POLICIES = {
    "light": jax.checkpoint_policies.save_only_these_names("dwconv", "dwconv_spectrum", "pwconv1"),
    "full": None,  # nothing saved inside the block
}


def remat_mode(flag: bool | str) -> str:
    mode = {False: "none", True: "full"}.get(flag, flag) if isinstance(flag, bool) else flag
    if mode != "none" and mode not in REMAT_POLICIES:
        raise ValueError(f"unknown remat mode {flag!r}; use none, light, full or a bool")
    return mode


_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the parameter shapes, plus numerics that do not."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    in_chans: int = 3
    num_classes: int = 2
    drop_path_rate: float = 0.0
    depthwise_impl: str = "auto"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Per stage: "none" (False), "light" (save dwconv + pwconv1 outputs, recompute the elementwise
    # LayerNorm/GELU/GRN in the backward) or "full" (True: recompute each block from its input).
    remat_stages: tuple[bool | str, ...] = (False, False, False, False)

    @classmethod
    def from_size(cls, size: str, **kwargs) -> ModelSpec:
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose from {list(SIZES)}")
        depths, dims = SIZES[size]
        return cls(depths=depths, dims=dims, **kwargs)

    @property
    def embed_dim(self) -> int:
        return self.dims[-1]


def _layer_norm(dim: int, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs)


class DepthwiseConv3d(nnx.Module):
    """7x7x7 depthwise conv with the Flax grouped-conv kernel layout (kd, kh, kw, 1, C)."""

    def __init__(self, dim: int, kernel_size: int, impl: str, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_trunc_normal(rngs.params(), (kernel_size,) * 3 + (1, dim)))
        self.bias = nnx.Param(jnp.zeros((dim,)))
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return depthwise_conv3d(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype), impl=self.impl
        )


def safe_sqrt(sum_sq: jax.Array) -> jax.Array:
    """sqrt with torch.norm's zero gradient at 0 (plain sqrt's is infinite, giving NaN). A GELU channel
    can be exactly 0 over a whole volume when its inputs are large and negative (erf saturates), as
    with FCMAE's std-1 initialisation at small widths."""
    positive = sum_sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)


class GRN(nnx.Module):
    """Global response normalisation over the spatial axes, per sample and channel."""

    def __init__(self, dim: int):
        self.gamma = nnx.Param(jnp.zeros((dim,)))
        self.beta = nnx.Param(jnp.zeros((dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        g = safe_sqrt(jnp.sum(jnp.square(xf), axis=(1, 2, 3), keepdims=True))
        n = g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)
        out = self.gamma[...] * (xf * n) + self.beta[...] + xf
        return out.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in PyTorch's erf form, x/2 (1 + erf(x/sqrt 2)).

    jax.nn.gelu(approximate=False) goes through erfc, which XLA expands into two rational
    approximations, an exp and selects per element. On one real-size stage-0 activation
    (50176x384) forward plus backward took 61 ms that way and 54 ms this way; in the whole step's
    profile GELU went from 0.55 to 0.23 s (BENCHMARKS.md)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype)))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, dim: int, drop_path_rate: float, impl: str, dtype, rngs: nnx.Rngs):
        self.dwconv = DepthwiseConv3d(dim, 7, impl, dtype, rngs)
        self.norm = _layer_norm(dim, rngs, dtype)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, kernel_init=_trunc_normal, bias_init=_zeros, dtype=dtype, rngs=rngs)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nnx.Linear(4 * dim, dim, kernel_init=_trunc_normal, bias_init=_zeros, dtype=dtype, rngs=rngs)
        self.drop_path_rate = drop_path_rate

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = checkpoint_name(self.dwconv(x), "dwconv")
        y = self.norm(y)
        y = checkpoint_name(self.pwconv1(y), "pwconv1")
        y = gelu(y)
        y = self.grn(y)
        y = self.pwconv2(y)
        return x + drop_path(y, self.drop_path_rate, key)


class PatchConv(nnx.Module):
    """Conv3d whose kernel equals its stride (the stem k4/s4, downsamples k2/s2 and the final 1x1x1),
    computed as non-overlapping patches times a matrix. Same numbers as a 'VALID' convolution and the
    same Flax kernel layout (k, k, k, in, out); a matmul is fast on every backend, and it avoids an XLA
    CPU partitioner bug that returned wrong values for a lane-vmapped, lane-sharded 1x1x1 conv
    (jax 0.10.2)."""

    def __init__(self, din: int, dout: int, k: int, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_trunc_normal(rngs.params(), (k, k, k, din, dout)))
        self.bias = nnx.Param(jnp.zeros((dout,)))
        self.k, self.dtype = k, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.k
        n, d, h, w, c = x.shape
        d, h, w = d // k, h // k, w // k  # 'VALID' drops any remainder, as PyTorch does
        x = x[:, : d * k, : h * k, : w * k].astype(self.dtype)
        patches = x.reshape(n, d, k, h, k, w, k, c)
        y = jnp.einsum("ndahbwce,abcef->ndhwf", patches, self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class ConvNeXtV2(nnx.Module):
    """The encoder: returns the final-LayerNorm'd globally pooled features (N, E)."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        dtype = jnp.dtype(spec.dtype)
        dims, depths = spec.dims, spec.depths
        # Stem k4/s4 then LayerNorm; later transitions LayerNorm then conv k2/s2, except the last,
        # which upstream makes a 1x1x1 stride-1 conv (total downsampling 16, not 32).
        layers = [nnx.List([PatchConv(spec.in_chans, dims[0], 4, dtype, rngs), _layer_norm(dims[0], rngs, dtype)])]
        for i in range(1, 4):
            k = 1 if i == 3 else 2
            norm = _layer_norm(dims[i - 1], rngs, dtype)
            layers.append(nnx.List([norm, PatchConv(dims[i - 1], dims[i], k, dtype, rngs)]))
        self.downsample_layers = nnx.List(layers)
        rates = np.linspace(0.0, spec.drop_path_rate, sum(depths)).tolist()
        stages, cursor = [], 0
        for i in range(4):
            stages.append(
                nnx.List(
                    [Block(dims[i], rates[cursor + j], spec.depthwise_impl, dtype, rngs) for j in range(depths[i])]
                )
            )
            cursor += depths[i]
        self.stages = nnx.List(stages)
        self.norm = _layer_norm(dims[-1], rngs, jnp.float32)
        self.remat_stages = tuple(remat_mode(f) for f in spec.remat_stages)
        self.dtype = dtype

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if x.ndim != 5 or min(x.shape[1:4]) < 16:
            # Total stride is 16 (4 * 2 * 2); smaller inputs would pool over an empty volume.
            raise ValueError(f"expected channels-last input (N, D, H, W, C) with D, H, W >= 16, got {x.shape}")
        x = x.astype(self.dtype)
        keys = None if key is None else jax.random.split(key, sum(len(s) for s in self.stages))
        cursor = 0
        for i in range(4):
            for layer in self.downsample_layers[i]:
                x = layer(x)
            for block in self.stages[i]:
                k = None if keys is None else keys[cursor]
                mode = self.remat_stages[i] if i < len(self.remat_stages) else "none"
                if mode != "none":
                    x = nnx.remat(lambda blk, y, kk: blk(y, kk), policy=REMAT_POLICIES[mode])(block, x, k)
                else:
                    x = block(x, k)
                cursor += 1
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
        return self.norm(pooled)


class ReLU(nnx.Module):
    """Placeholder at head index 2 (no parameters), so head indices match upstream's nn.Sequential."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class Classifier(nnx.Module):
    """Upstream `Classifier(convnextv2_*(), num_classes)`: encoder -> Linear(E,256)-BN-ReLU-Linear."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.encoder = ConvNeXtV2(spec, rngs)
        e = spec.embed_dim
        self.head = nnx.List(
            [
                nnx.Linear(e, HEAD_HIDDEN, kernel_init=_trunc_normal, bias_init=_zeros, rngs=rngs),
                nnx.BatchNorm(HEAD_HIDDEN, epsilon=BN_EPS, momentum=BN_MOMENTUM, rngs=rngs),
                ReLU(),
                nnx.Linear(HEAD_HIDDEN, spec.num_classes, kernel_init=_trunc_normal, bias_init=_zeros, rngs=rngs),
            ]
        )

    def features(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.encoder(x, key)

    def __call__(self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        f = self.encoder(x, key if train else None)
        h = self.head[0](f)
        h = self.head[1](h, use_running_average=not train)
        h = self.head[2](h)
        return self.head[3](h)
