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

import jax
import numpy as np
from tqdm.auto import tqdm

from pfq.faults import maybe_fail
from pfq.train.checkpoint import GroupCheckpointer
from pfq.train.distributed import global_batch, to_host

log = logging.getLogger("pfq.train")


def adopt_iterator_state(iterator, meta: dict) -> None:
    """Move the data iterator to a checkpoint's stored position, refusing a position that belongs to
    another step (element s of the training dataset is step s, so they must agree)."""
    stored = meta["data_iterator"]
    position = stored.get("next_index") if isinstance(stored, dict) else None
    if position is not None and position != meta["step"]:
        raise ValueError(f"its data_iterator state is at step {position!r:.40}, not {meta['step']}")
    iterator.set_state(stored)


def train_loop(
    name: str,
    ckpt: GroupCheckpointer,
    state: dict,
    step_program: Callable,
    keys: jax.Array,
    iterator,
    batch_spec: dict,
    *,
    batch_sh,
    steps: int,
    log_every: int,
    save_every: int,
    progress: bool = True,
    on_log: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[dict, np.ndarray, bool]:
    """Resume from the newest readable checkpoint, then train to `steps`, saving every `save_every`
    steps and at the end. Returns (state, last logged per-lane loss, whether a program was compiled).
    `step_program(state, batch, keys) -> (state, metrics with "loss")` is the jitted, lane-vmapped
    step (`pfq.train.program`); it is compiled here for `batch_spec`."""
    start, compiled = 0, False
    initial = iterator.get_state()
    restored = ckpt.restore(state, adopt_meta=lambda meta: adopt_iterator_state(iterator, meta))
    if restored is not None:
        start, state, meta = restored
        log.info("%s: resumed from step %d", name, start)
    else:
        iterator.set_state(initial)  # a rejected candidate may have moved it
    lanes, batch_size = batch_spec["image"].shape[:2]
    loss = np.full(lanes, np.nan)
    all_diverged = lambda: bool((to_host(state["diverged_step"]) >= 0).all())  # a host sync
    if start < steps and start > 0 and all_diverged():
        log.warning("%s: every lane had diverged by step %d; not training further", name, start)
        return state, loss, compiled
    if start >= steps:
        return state, loss, compiled
    t0 = time.perf_counter()
    step = step_program.lower(state, batch_spec, keys).compile()
    compiled = True
    log.info("%s: compiled the %d-lane step in %.1f s", name, lanes, time.perf_counter() - t0)
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=f"{name} ({lanes} lanes)",
        disable=not progress,
        dynamic_ncols=True,
    )
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
