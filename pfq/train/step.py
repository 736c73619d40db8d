"""Pure per-lane train and predict steps. The trainer vmaps them over lanes and jits them once.

A lane's state is a plain dict: params, batch_stats, opt_state, step, and divergence bookkeeping.
A step whose loss is not finite leaves the state untouched and records the step, so a diverged lane
is frozen on the device without a host round trip and the other lanes continue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pfq.model import ModelSpec, apply

State = dict[str, Any]

# Why a lane was frozen, as recorded in its state's `diverged_reason`.
DIVERGED_REASONS = ("", "non-finite loss", "non-finite gradient")


def init_state(variables: dict, tx: optax.GradientTransformation) -> State:
    return {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
        "diverged_step": jnp.full((), -1, jnp.int32),  # -1 while the lane is healthy
        "diverged_reason": jnp.zeros((), jnp.int32),  # an index into DIVERGED_REASONS
    }


def classification_loss(logits: jax.Array, labels: jax.Array, loss: str = "ce") -> jax.Array:
    """Cross-entropy as upstream; 'bce' uses the positive-class logit difference for binary tasks."""
    if loss == "bce":
        margin = logits[:, 1] - logits[:, 0]
        return optax.sigmoid_binary_cross_entropy(margin, labels.astype(logits.dtype)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def guarded_update(
    state: State, value: jax.Array, grads: Any, tx: optax.GradientTransformation, updated: dict
) -> State:
    """Apply `grads` (and replace the `updated` state entries) unless the loss or the gradient is not
    finite or the lane is already frozen; a lane that turns non-finite now records the step."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite_loss, finite_grads = jnp.isfinite(value), jnp.isfinite(optax.global_norm(grads))
    healthy = (state["diverged_step"] < 0) & finite_loss & finite_grads
    candidate = {"params": params, "opt_state": opt_state, **updated}
    kept = jax.tree.map(lambda new, old: jnp.where(healthy, new, old), candidate, {k: state[k] for k in candidate})
    now = (state["diverged_step"] < 0) & ~healthy
    diverged_step = jnp.where(now, state["step"], state["diverged_step"])
    reason = jnp.where(now, jnp.where(finite_loss, 2, 1), state["diverged_reason"]).astype(jnp.int32)
    return dict(state, **kept, step=state["step"] + 1, diverged_step=diverged_step, diverged_reason=reason)


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation, loss: str = "ce") -> Callable:
    def train_step(state: State, batch: dict, key: jax.Array) -> tuple[State, dict]:
        step_key = jax.random.fold_in(key, state["step"])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            logits, stats = apply(spec, variables, batch["image"], train=True, key=step_key)
            logits = logits.astype(jnp.float32)
            return classification_loss(logits, batch["label"], loss), (stats, logits)

        (value, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new_state = guarded_update(state, value, grads, tx, {"batch_stats": stats})
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return new_state, {"loss": value, "accuracy": accuracy}

    return train_step


def make_predict_step(spec: ModelSpec) -> Callable:
    def predict_step(variables: dict, images: jax.Array) -> jax.Array:
        logits, _ = apply(spec, variables, images, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return predict_step
