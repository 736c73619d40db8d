"""Pure per-lane FCMAE pretraining step and its optimiser (the pretrainer vmaps it over seeds).

The state is the finetuning step's (params, opt_state, step, divergence bookkeeping, with empty
batch_stats) plus `losses`, every step's loss, so the loss curve survives a resume exactly. A step
whose loss or gradient is not finite leaves the lane frozen, as in finetuning.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from ml_collections import ConfigDict

from pfq.pretrain.model import FCMAESpec, Params, forward, grid_shape, random_mask
from pfq.train.optim import make_optimizer
from pfq.train.step import State, guarded_update, init_state


def decay_mask(params: Params) -> Params:
    """Upstream's pretraining rule (no decay for biases and 1-D parameters of the torch model): every
    kernel, the GRN parameters (stored (1, C) upstream) and the mask token are decayed; biases and
    LayerNorm parameters are not."""
    flat = traverse_util.flatten_dict(params)
    rule = lambda path: path[-1] == "kernel" or "grn" in path or path == ("mask_token",)
    return traverse_util.unflatten_dict({k: rule(k) for k in flat})


def make_tx(config, params: Params, spec: FCMAESpec, steps: int) -> optax.GradientTransformation:
    """`config`: the run config's `pretrain` section (lr, weight_decay, warmup_steps, b2, grad_clip); as
    upstream, cosine decay to 0, no layer-wise decay, every parameter trained."""
    optim = ConfigDict(
        {
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup_steps,
            "b2": config.b2,
            "grad_clip": config.get("grad_clip", 0.0),
            "final_lr_fraction": 0.0,
            "layer_decay": 1.0,
            "mode": "full",
        }
    )
    return make_optimizer(optim, params, spec.encoder.depths, steps, decay_mask=decay_mask(params))


def pretrain_init_state(params: Params, tx: optax.GradientTransformation, steps: int) -> State:
    state = init_state({"params": params, "batch_stats": {}}, tx)
    state["losses"] = jnp.full((steps,), jnp.nan, jnp.float32)
    return state


def make_pretrain_step(spec: FCMAESpec, tx: optax.GradientTransformation, input_size) -> Callable:
    grid = grid_shape(tuple(input_size))

    def pretrain_step(state: State, batch: dict, key: jax.Array) -> tuple[State, dict]:
        images = batch["image"]
        mask = random_mask(jax.random.fold_in(key, state["step"]), images.shape[0], grid, spec.mask_ratio)
        value, grads = jax.value_and_grad(lambda p: forward(spec, p, images, mask)[0])(state["params"])
        new_state = guarded_update(state, value, grads, tx, {})
        new_state["losses"] = state["losses"].at[state["step"]].set(value)
        return new_state, {"loss": value}

    return pretrain_step
