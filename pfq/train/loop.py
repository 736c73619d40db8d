"""The training loop shared by finetuning and pretraining: resume, compile once, step, log, checkpoint.

A lane group's state (lane-stacked, on the mesh) is advanced by one compiled `jit(vmap(step))` per
step; the only host syncs are every `log_every` steps. A kill anywhere resumes from the newest
readable checkpoint with the data iterator's state, so the final state does not depend on where the
run was interrupted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pfq.faults import maybe_fail
from pfq.train.checkpoint import GroupCheckpointer
from pfq.train.distributed import global_batch, to_host

log = logging.getLogger("pfq.train")


def train_loop(name: str, ckpt: GroupCheckpointer, state: dict, step_fn: Callable, keys: jax.Array, iterator,
               batch_spec: dict, *, lane_sh, batch_sh, steps: int, log_every: int, save_every: int,
               progress: bool = True, on_log: Callable[[int, np.ndarray], None] | None = None
               ) -> tuple[dict, np.ndarray, bool]:
    """Resume from the newest readable checkpoint, then train to `steps`, saving every `save_every`
    steps and at the end. Returns (state, last logged per-lane loss, whether a program was compiled).
    `step_fn(state, batch, keys) -> (state, metrics with "loss")` is one lane's step; it is vmapped."""
    start, compiled = 0, False
    restored = ckpt.restore(state)
    if restored is not None:
        start, state, meta = restored
        iterator.set_state(meta["data_iterator"])
        log.info("%s: resumed from step %d", name, start)
    lanes, batch_size = batch_spec["image"].shape[:2]
    loss = np.full(lanes, np.nan)
    all_diverged = lambda: bool((to_host(state["diverged_step"]) >= 0).all())  # a host sync
    if start < steps and start > 0 and all_diverged():
        log.warning("%s: every lane had diverged by step %d; not training further", name, start)
        return state, loss, compiled
    if start >= steps:
        return state, loss, compiled
    t0 = time.perf_counter()
    step = jax.jit(jax.vmap(step_fn), donate_argnums=0, out_shardings=(lane_sh, lane_sh)
                   ).lower(state, batch_spec, keys).compile()
    compiled = True
    log.info("%s: compiled the %d-lane step in %.1f s", name, lanes, time.perf_counter() - t0)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{name} ({lanes} lanes)",
               disable=not progress, dynamic_ncols=True)
    for s in bar:
        batch = global_batch(next(iterator), batch_sh, (lanes, batch_size))
        state, metrics = step(state, batch, keys)
        done = s + 1
        maybe_fail("train_step", done)
        stop = False
        if done % log_every == 0 or done == steps:  # the only host syncs in the loop
            loss = to_host(metrics["loss"])
            finite = loss[np.isfinite(loss)]
            bar.set_postfix(loss=f"{finite.mean():.3f}" if finite.size else "nan")
            if on_log is not None:
                on_log(done, loss)
            stop = done < steps and all_diverged()
        if done % save_every == 0 or done == steps or stop:
            ckpt.save(done, state, {"data_iterator": iterator.get_state(), "step": done})
        if stop:  # frozen lanes would not change any more: save and skip the remaining steps
            log.warning("%s: every lane has diverged by step %d; not training further", name, done)
            break
    bar.close()
    return state, loss, compiled


def batch_spec_for(lanes: int, batch_size: int, input_size, batch_sh) -> dict[str, Any]:
    """Shapes of the pipeline's lane-stacked batch (`pfq.data.pipeline.train_dataset`)."""
    shape = (lanes, batch_size) + tuple(input_size) + (3,)
    return {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh),
            "label": jax.ShapeDtypeStruct(shape[:2], jnp.int32, sharding=batch_sh)}
