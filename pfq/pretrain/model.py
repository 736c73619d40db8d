"""FCMAE (fully convolutional masked autoencoder) for ProFound-Conv, with the sparse encoder emulated
exactly by dense masked operations.

Upstream pretrains ProFound-Conv with a sparse (MinkowskiEngine) encoder that only ever sees the kept
patches. Here the same computation runs densely: every layer's output is multiplied by the keep mask
at that layer's resolution before anything mixes sites, so at kept sites the numbers are the sparse
encoder's and masked sites are exactly zero (what the sparse tensor's `.dense()` gives). The encoder
is pfq's dense `ConvNeXtV2`, so its trained parameters are the dense encoder's, name for name.

Numerics that follow upstream:
* the patch equals the encoder's total stride (16: strides 4, 2, 2, 1), and the mask is drawn on the
  patch grid and repeated up to each stage's grid, so every stride-2 window is fully kept or masked;
* the stem (dense k4/s4 conv + LayerNorm) sees the whole image, then its output is masked;
* the sparse GRN's statistic is taken over the kept voxels of *all samples of the batch*
  (`grn_stats="batch"`); `"sample"` takes it per sample, as the dense GRN does when finetuning;
* decoder: 1x1x1 projection to `decoder_dim`, mask token at masked sites, dense ConvNeXt-V2 blocks,
  1x1x1 prediction of each patch's voxels (patch-major, channel fastest, as upstream's `patchify`);
* loss: mean squared error on masked patches only, with per-patch normalised targets (mean and
  unbiased variance over all of a patch's voxels and channels, eps 1e-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfq.model.convnext import Block, ConvNeXtV2, ModelSpec, PatchConv, gelu, safe_sqrt
from pfq.model.functional import _pure

PATCH = 16  # = the encoder's total stride (4 * 2 * 2 * 1)
STAGE_STRIDES = (4, 8, 16, 16)  # input voxels per site at each stage
GRN_STATS = ("batch", "sample")
INITS = ("upstream", "trunc002")


@dataclass(frozen=True)
class FCMAESpec:
    encoder: ModelSpec
    decoder_dim: int = 512
    decoder_depth: int = 1
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True
    grn_stats: str = "batch"  # "batch": upstream's sparse GRN; "sample": per sample, as the dense GRN
    init: str = "upstream"  # "upstream": FCMAE's re-initialisation; "trunc002": pfq's dense init
    in_chans: int = field(init=False, default=3)

    def __post_init__(self):
        if self.grn_stats not in GRN_STATS:
            raise ValueError(f"grn_stats must be one of {GRN_STATS}, got {self.grn_stats!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        object.__setattr__(self, "in_chans", self.encoder.in_chans)

    @property
    def patch_dim(self) -> int:
        return PATCH**3 * self.in_chans


def grid_shape(input_size: tuple[int, int, int]) -> tuple[int, int, int]:
    if any(s % PATCH for s in input_size):
        raise ValueError(f"FCMAE input size {tuple(input_size)} must be a multiple of the patch size {PATCH}")
    return tuple(s // PATCH for s in input_size)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Upstream's `int(L * (1 - ratio))` (a floor), at least one patch."""
    return max(1, int(num_patches * (1 - mask_ratio)))


# ----------------------------------------------------------------------------------------------
# The network (NNX): the dense encoder plus FCMAE's projection, mask token, decoder and prediction.
# ----------------------------------------------------------------------------------------------
class FCMAE(nnx.Module):
    def __init__(self, spec: FCMAESpec, rngs: nnx.Rngs):
        enc = spec.encoder
        dtype = jnp.dtype(enc.dtype)
        self.encoder = ConvNeXtV2(enc, rngs)
        self.proj = PatchConv(enc.embed_dim, spec.decoder_dim, 1, dtype, rngs)
        self.mask_token = nnx.Param(jnp.zeros((spec.decoder_dim,)))
        self.decoder = nnx.List(
            [Block(spec.decoder_dim, 0.0, enc.depthwise_impl, dtype, rngs) for _ in range(spec.decoder_depth)]
        )
        self.pred = PatchConv(spec.decoder_dim, spec.patch_dim, 1, dtype, rngs)
        self.grn_stats, self.norm_pix = spec.grn_stats, spec.norm_pix_loss

    def encode(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Masked encoder: image (N, D, H, W, C), mask (N, gd, gh, gw), 1 = removed ->
        (N, gd, gh, gw, E), exactly zero at masked sites."""
        enc = self.encoder
        x = x.astype(enc.dtype)
        keep = [upsample(1.0 - mask, PATCH // s).astype(enc.dtype)[..., None] for s in STAGE_STRIDES]
        for i in range(4):
            first, second = enc.downsample_layers[i]
            x = second(first(x)) * keep[i] if i == 0 else second(first(x) * keep[i - 1]) * keep[i]
            for block in enc.stages[i]:
                x = x + self.masked_block(block, x, keep[i])  # drop path is 0 in FCMAE, as upstream
        return x

    def masked_block(self, block: Block, x: jax.Array, keep: jax.Array) -> jax.Array:
        """The sparse ConvNeXt-V2 block's residual branch; `x` is already zero at masked sites."""
        y = block.dwconv(x) * keep
        y = gelu(block.pwconv1(block.norm(y))) * keep  # zero before GRN's reduction over sites
        yf = y.astype(jnp.float32)
        axes = (0, 1, 2, 3) if self.grn_stats == "batch" else (1, 2, 3)
        g = safe_sqrt(jnp.sum(jnp.square(yf), axis=axes, keepdims=True))
        n = g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)
        y = (block.grn.gamma[...] * (yf * n) + block.grn.beta[...] + yf).astype(y.dtype)
        return block.pwconv2(y) * keep

    def decode(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        """(N, gd, gh, gw, E) -> per-patch predictions (N, gd, gh, gw, PATCH^3 * C)."""
        x = self.proj(z)
        m = mask[..., None].astype(x.dtype)
        x = x * (1.0 - m) + self.mask_token[...].astype(x.dtype) * m
        for block in self.decoder:
            x = block(x)
        return self.pred(x)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(loss, prediction) for images `x` and mask `mask` (1 = removed)."""
        pred = self.decode(self.encode(x, mask), mask).astype(jnp.float32)
        return reconstruction_loss(x, pred, mask, self.norm_pix), pred


def upsample(mask: jax.Array, factor: int) -> jax.Array:
    """Repeat each patch-grid site `factor` times along D, H and W."""
    for axis in (1, 2, 3):
        mask = jnp.repeat(mask, factor, axis=axis)
    return mask


def random_mask(key: jax.Array, batch: int, grid: tuple[int, int, int], mask_ratio: float) -> jax.Array:
    """Upstream's `gen_random_mask`: a random subset of `num_kept` patches per sample is kept; 1 = removed."""
    num = math.prod(grid)
    rank = jnp.argsort(jnp.argsort(jax.random.normal(key, (batch, num)), axis=1), axis=1)
    return (rank >= num_kept(num, mask_ratio)).astype(jnp.float32).reshape((batch,) + tuple(grid))


def patchify(x: jax.Array) -> jax.Array:
    """(N, D, H, W, C) -> (N, gd, gh, gw, PATCH^3 * C), voxel-major within a patch and channel fastest."""
    n, d, h, w, c = x.shape
    p = PATCH
    x = x.reshape(n, d // p, p, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, d // p, h // p, w // p, p**3 * c)


def unpatchify(x: jax.Array, channels: int) -> jax.Array:
    n, gd, gh, gw, _ = x.shape
    p = PATCH
    x = x.reshape(n, gd, gh, gw, p, p, p, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, gd * p, gh * p, gw * p, channels)


def normalised_target(x: jax.Array) -> jax.Array:
    """Per-patch normalised pixels: (t - mean) / sqrt(var + 1e-6), unbiased variance (torch `.var`)."""
    t = patchify(x.astype(jnp.float32))
    mean = jnp.mean(t, axis=-1, keepdims=True)
    var = jnp.var(t, axis=-1, keepdims=True, ddof=1)
    return (t - mean) / jnp.sqrt(var + 1e-6)


def reconstruction_loss(x: jax.Array, pred: jax.Array, mask: jax.Array, norm_pix: bool = True) -> jax.Array:
    target = normalised_target(x) if norm_pix else patchify(x.astype(jnp.float32))
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


# ----------------------------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------------------------
def _upstream_init(params: dict, key: jax.Array) -> dict:
    """FCMAE's `_init_weights`, applied after the encoder is built: trunc-normal std 1 (cut at +-2)
    for the sparse depthwise and linear kernels and every dense Conv3d (stem, proj, pred, decoder
    dwconv); std 0.02 for the sparse downsampling convs; zero biases; mask token N(0, 0.02); the
    decoder's Linear layers keep PyTorch's default U(+-1/sqrt(fan_in)) weights and biases."""
    flat = {tuple(str(k) for k in path): v for path, v in _flatten(params)}
    keys = iter(jax.random.split(key, len(flat)))
    std1 = lambda k, s: jax.random.truncated_normal(k, -2.0, 2.0, s, jnp.float32)
    out = {}
    for path, v in flat.items():
        k = next(keys)
        name, leaf = path[-2] if len(path) > 1 else "", path[-1]
        part = path[0]
        if path == ("mask_token",):
            out[path] = 0.02 * jax.random.normal(k, v.shape)
        elif part == "decoder" and name in ("pwconv1", "pwconv2"):
            bound = 1.0 / math.sqrt(v.shape[0] if leaf == "kernel" else flat[path[:-1] + ("kernel",)].shape[0])
            out[path] = jax.random.uniform(k, v.shape, jnp.float32, -bound, bound)
        elif leaf == "kernel" and part == "encoder" and path[1] == "downsample_layers" and path[2] != "0":
            out[path] = 0.02 * jax.random.truncated_normal(k, -2.0, 2.0, v.shape, jnp.float32)
        elif leaf == "kernel":
            out[path] = std1(k, v.shape)
        else:  # biases 0, LayerNorms (1, 0), GRN (0, 0): as constructed
            out[path] = v
    return _unflatten_like(params, out)


def _flatten(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _unflatten_like(tree: dict, flat: dict, prefix: tuple = ()) -> dict:
    return {
        k: _unflatten_like(v, flat, prefix + (str(k),)) if isinstance(v, dict) else flat[prefix + (str(k),)]
        for k, v in tree.items()
    }


# ----------------------------------------------------------------------------------------------
# Pure-function interface: params are plain nested dicts {"encoder", "proj", "mask_token", "decoder", "pred"}.
# ----------------------------------------------------------------------------------------------
Params = dict[str, Any]


@lru_cache(maxsize=16)
def _graph(spec: FCMAESpec):
    abstract = nnx.eval_shape(lambda: FCMAE(spec, nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, params


@lru_cache(maxsize=16)
def _jitted_init(spec: FCMAESpec):
    def init(key: jax.Array) -> Params:
        k_dense, k_upstream = jax.random.split(key)
        params = _pure(nnx.state(FCMAE(spec, nnx.Rngs(params=k_dense)), nnx.Param))
        params["mask_token"] = 0.02 * jax.random.normal(k_upstream, params["mask_token"].shape)
        return _upstream_init(params, k_upstream) if spec.init == "upstream" else params

    return jax.jit(init)


def init_params(spec: FCMAESpec, key: jax.Array) -> Params:
    return _jitted_init(spec)(key)


def bind(spec: FCMAESpec, params: Params) -> FCMAE:
    graphdef, abstract = _graph(spec)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(spec: FCMAESpec, params: Params, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss, per-patch prediction)."""
    return bind(spec, params)(x, mask)


def encode(spec: FCMAESpec, params: Params, x: jax.Array, mask: jax.Array) -> jax.Array:
    return bind(spec, params).encode(x, mask)


def decode(spec: FCMAESpec, params: Params, z: jax.Array, mask: jax.Array) -> jax.Array:
    return bind(spec, params).decode(z, mask)
