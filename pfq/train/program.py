"""The compiled programs of a lane group, built in one place for the trainer and for `pfq.plan`.

`pfq.plan` compiles exactly these functions ahead of time for a described TPU topology, so what it
reports is what the trainer will run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from pfq.model import ModelSpec, abstract_variables
from pfq.train import lanes as lanes_lib
from pfq.train.optim import make_optimizer
from pfq.train.step import init_state, make_predict_step, make_train_step


def jit_train_step(spec: ModelSpec, tx: optax.GradientTransformation, loss: str, lane_sh: NamedSharding) -> Callable:
    """jit(vmap(train_step)) over lanes, donating the state; state and metrics stay lane-sharded."""
    return jax.jit(jax.vmap(make_train_step(spec, tx, loss)), donate_argnums=0, out_shardings=(lane_sh, lane_sh))


def jit_predict_step(spec: ModelSpec) -> Callable:
    """jit(vmap(predict_step)) over lanes; the images are shared by every lane."""
    return jax.jit(jax.vmap(make_predict_step(spec), in_axes=(0, None)))


def batch_spec(num_lanes: int, batch_size: int, input_size, batch_sh: NamedSharding) -> dict:
    """Shapes of one training batch: (lanes, batch, D, H, W, 3) images and (lanes, batch) labels."""
    shape = (num_lanes, batch_size) + tuple(int(s) for s in input_size) + (3,)
    return {
        "image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh),
        "label": jax.ShapeDtypeStruct(shape[:2], jnp.int32, sharding=batch_sh),
    }


# ----------------------------------------------------------------------------------------------
# The same programs lowered from shapes alone (no data, no device memory): for `pfq.plan`, which
# compiles them for described TPUs, and for the trainer's memory check before it loads any data.
# ----------------------------------------------------------------------------------------------
def abstract_group(spec: ModelSpec, optim, num_lanes: int, lane_sh: NamedSharding) -> tuple:
    """(tx, state, keys) of a lane group as the trainer builds them, as sharded ShapeDtypeStructs."""
    single = abstract_variables(spec)
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct((num_lanes,) + s.shape, s.dtype), single)
    tx = make_optimizer(optim, single["params"], spec.depths, int(optim.steps))
    state = jax.eval_shape(jax.vmap(lambda v: init_state(v, tx)), variables)
    keys = jax.eval_shape(
        jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1)), jax.ShapeDtypeStruct((num_lanes,), np.uint32)
    )
    shard = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=lane_sh)
    return tx, jax.tree.map(shard, state), jax.tree.map(shard, keys)


def lower_train_step(spec: ModelSpec, config, devices: list, num_lanes: int) -> tuple:
    """The train step of a `num_lanes` group on `devices`, lowered from shapes: (lowered, mesh)."""
    batch_size = int(config.optim.batch_size)
    mesh = lanes_lib.make_mesh(num_lanes, batch_size, devices)
    lane_sh, batch_sh = lanes_lib.lane_sharding(mesh), lanes_lib.batch_sharding(mesh)
    tx, state, keys = abstract_group(spec, config.optim, num_lanes, lane_sh)
    batch = batch_spec(num_lanes, batch_size, config.data.input_size, batch_sh)
    return jit_train_step(spec, tx, config.optim.loss, lane_sh).lower(state, batch, keys), mesh


def lower_predict_step(spec: ModelSpec, config, devices: list, num_lanes: int):
    """The predict step of a `num_lanes` group (one eval batch, shared by the lanes), lowered from shapes."""
    mesh = lanes_lib.make_mesh(num_lanes, int(config.optim.batch_size), devices)
    lane_sh = lanes_lib.lane_sharding(mesh)
    variables = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((num_lanes,) + s.shape, s.dtype, sharding=lane_sh), abstract_variables(spec)
    )
    images = jax.ShapeDtypeStruct(
        (int(config.eval_batch_size),) + tuple(int(s) for s in config.data.input_size) + (3,),
        jnp.float32,
        sharding=lanes_lib.replicated(mesh),
    )
    return jit_predict_step(spec).lower(variables, images)
