"""The compiled programs of a lane group, built in one place for the trainer and for `pfq.plan`.

`pfq.plan` compiles exactly these functions ahead of time for a described TPU topology, so what it
reports is what the trainer will run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from pfq.model import ModelSpec
from pfq.train.step import make_predict_step, make_train_step


def jit_train_step(spec: ModelSpec, tx: optax.GradientTransformation, loss: str,
                   lane_sh: NamedSharding) -> Callable:
    """jit(vmap(train_step)) over lanes, donating the state; state and metrics stay lane-sharded."""
    return jax.jit(jax.vmap(make_train_step(spec, tx, loss)), donate_argnums=0, out_shardings=(lane_sh, lane_sh))


def jit_predict_step(spec: ModelSpec) -> Callable:
    """jit(vmap(predict_step)) over lanes; the images are shared by every lane."""
    return jax.jit(jax.vmap(make_predict_step(spec), in_axes=(0, None)))


def batch_spec(num_lanes: int, batch_size: int, input_size, batch_sh: NamedSharding) -> dict:
    """Shapes of one training batch: (lanes, batch, D, H, W, 3) images and (lanes, batch) labels."""
    shape = (num_lanes, batch_size) + tuple(int(s) for s in input_size) + (3,)
    return {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh),
            "label": jax.ShapeDtypeStruct(shape[:2], jnp.int32, sharding=batch_sh)}
