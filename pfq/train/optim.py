"""Optimiser and schedule (optax): AdamW, linear warm-up then cosine decay, as upstream finetuning.

Layer-wise learning-rate decay scales each parameter's update by decay**(depth from the top), with
upstream ConvNeXt's grouping of layers; linear probing freezes the encoder.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

# Parameters whose only effect is a constant shift of the head's training-mode BatchNorm input:
# their exact gradient is zero, and Adam would turn float rounding noise in it into lr-sized steps
# that differ with the device count (summation order). They are held fixed instead.
BATCHNORM_SHIFTED = {("encoder", "norm", "bias"), ("head", 0, "bias")}


def layer_id(path: tuple, depths: tuple[int, ...]) -> int:
    """Upstream ConvNeXt layer id: 0 for the stem, stage 0/1/3 blocks share ids with their
    transition, stage 2 blocks in groups of 3, head and final norm on top."""
    num_layers = 12  # upstream uses 12 groups for ConvNeXt finetuning
    if path[0] == "head" or path[:2] == ("encoder", "norm"):
        return num_layers + 1
    _, part, stage = path[0], path[1], int(path[2])
    if part == "downsample_layers":
        return 0 if stage == 0 else {1: 2, 2: 3, 3: num_layers}[stage]
    block = int(path[3])
    if stage in (0, 1):
        return stage + 1
    if stage == 2:
        return 3 + block // 3
    return num_layers


def lr_scales(params: Any, depths: tuple[int, ...], decay: float) -> Any:
    flat = traverse_util.flatten_dict(params)
    top = 13
    scales = {k: decay ** (top - layer_id(k, depths)) for k in flat}
    return traverse_util.unflatten_dict(scales)


def make_optimizer(
    config, params: Any, depths: tuple[int, ...], num_steps: int, decay_mask: Any = None
) -> optax.GradientTransformation:
    """`config`: a run config's `optim` section (`pfq.config.base_config`; `b2` optional, default 0.999).
    `decay_mask`: which leaves get weight decay (default: those with more than one dimension)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=min(config.warmup_steps, max(num_steps - 1, 0)),
        decay_steps=max(num_steps, 1),
        end_value=config.lr * config.final_lr_fraction,
    )
    parts = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    # As upstream, no weight decay on biases and norm parameters (1-D leaves).
    if decay_mask is None:
        decay_mask = jax.tree.map(lambda p: p.ndim > 1, params)
    parts.append(
        optax.adamw(schedule, b1=0.9, b2=config.get("b2", 0.999), weight_decay=config.weight_decay, mask=decay_mask)
    )
    decay = config.layer_decay
    if decay != 1.0:
        # Scaling the whole AdamW update equals scaling that group's learning rate (weight decay
        # included), which is what upstream's per-group lr does.
        parts.append(_scale_updates_by(lr_scales(params, depths, decay)))
    tx = optax.chain(*parts)
    probe = config.mode == "linear_probe"
    labels = traverse_util.unflatten_dict(
        {
            k: ("frozen" if (probe and k[0] == "encoder") or k in BATCHNORM_SHIFTED else "train")
            for k in traverse_util.flatten_dict(params)
        }
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _scale_updates_by(scales: Any) -> optax.GradientTransformation:
    def init(_):
        return optax.EmptyState()

    def update(updates, state, params=None):
        # Parameters held fixed by multi_transform arrive as MaskedNode placeholders: pass them through.
        is_masked = lambda x: isinstance(x, optax.MaskedNode)
        return jax.tree.map(lambda u, s: u if is_masked(u) else u * s, updates, scales, is_leaf=is_masked), state

    return optax.GradientTransformation(init, update)
