"""Orbax checkpoints of a lane group: the lane-stacked train state plus JSON metadata (data iterator
state, sweep progress). Saves are atomic (Orbax writes to a temporary folder and renames), so a kill
at any moment leaves the previous checkpoints readable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class GroupCheckpointer:
    def __init__(self, directory: Path, keep: int = 2, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, like_state: Any) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint restored onto `like_state`'s shapes and shardings; a checkpoint
        that fails to read is reported and the next older one tried."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return step, restored["state"], restored["meta"]
            except Exception as e:  # a truncated or partial checkpoint: fall back to an older one
                log.warning("checkpoint %s step %d is unreadable (%s: %s); trying an older one",
                            self.directory, step, type(e).__name__, e)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
