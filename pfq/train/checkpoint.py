"""Orbax checkpoints of a lane group: the lane-stacked train state plus JSON metadata (data iterator
state, sweep progress). Saves are atomic (Orbax writes to a temporary folder and renames), so a kill
at any moment leaves the previous checkpoints readable; temporary folders of interrupted saves are
removed on the next start.

A checkpoint that cannot be read back (a truncated file, a missing item, metadata that does not
belong to its step) is reported, moved aside to `<dir>.unreadable/`, and the next older one is
tried, so a damaged latest checkpoint costs the steps since the previous one and nothing else.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pfq.faults import maybe_fail

log = logging.getLogger(__name__)

ITEMS = ("state", "meta")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); older checkpoints are intact."""


def _brief(e: BaseException, head: int = 160, tail: int = 240) -> str:
    """One line: the start (what was being written) and the end (the OS's reason) of a long message."""
    text = " ".join(str(e).split())
    if len(text) > head + tail + 5:
        text = f"{text[:head]} ... {text[-tail:]}"
    return f"{type(e).__name__}: {text}"


class GroupCheckpointer:
    def __init__(self, directory: Path, keep: int = 2, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True, cleanup_tmp_directories=True
                ),
            )
        except OSError as e:
            raise CheckpointWriteError(f"cannot use the checkpoint directory {self.directory}: {e}") from e

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an asynchronous save; an error of an earlier save surfaces here or in `wait`."""
        maybe_fail("checkpoint_save", step)
        try:
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
            )
        except Exception as e:
            raise CheckpointWriteError(
                f"could not write a checkpoint in {self.directory} ({_brief(e)}); "
                "the checkpoints already there are intact"
            ) from e
        maybe_fail("checkpoint_async", step)

    def problems(self, step: int) -> list[str]:
        """What is visibly missing from a step's folder (a cheap check before Orbax reads it)."""
        folder = self.directory / str(step)
        return [f"item {item!r} is missing ({folder / item})" for item in ITEMS if not (folder / item).is_dir()]

    def restore(
        self, like_state: Any, adopt_meta: Callable[[dict], None] | None = None
    ) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint restored onto `like_state`'s shapes and shardings; a checkpoint
        that fails to read is reported, moved aside and the next older one tried. `adopt_meta(meta)`
        (e.g. setting the data iterator's state) runs on each candidate's metadata; if it raises,
        the checkpoint counts as damaged too."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like_state
        )
        unreadable = []
        result = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            problems = self.problems(step)
            if not problems:
                try:
                    restored = self.manager.restore(
                        step,
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
                    )
                    meta = restored["meta"]
                    if not isinstance(meta, dict) or meta.get("step") != step or "data_iterator" not in meta:
                        problems.append(f"item 'meta' does not describe step {step}: {meta!r:.200}")
                    else:
                        if adopt_meta is not None:
                            adopt_meta(meta)
                        result = step, restored["state"], meta
                except Exception as e:  # a truncated or partial checkpoint: fall back to an older one
                    problems.append(_brief(e))
            if result is not None:
                break
            log.warning(
                "checkpoint %s is unreadable (%s); falling back to an older one",
                self.directory / str(step),
                "; ".join(problems),
            )
            unreadable.append(step)
        for step in unreadable:
            self._move_aside(step)
        if unreadable:
            self.manager.reload()
        return result

    def _move_aside(self, step: int) -> None:
        """Keep an unreadable checkpoint for inspection, out of the way of the next save at its step."""
        if jax.process_index() != 0:
            return
        source = self.directory / str(step)
        aside = self.directory.with_name(self.directory.name + ".unreadable")
        dest = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(dest))
            log.warning("moved the unreadable checkpoint to %s", dest)
        except OSError as e:
            log.warning("could not move %s aside (%s); deleting it", source, e)
            shutil.rmtree(source, ignore_errors=True)

    def wait(self) -> None:
        maybe_fail("checkpoint_wait")
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointWriteError(
                f"could not write a checkpoint in {self.directory} ({_brief(e)}); "
                "the checkpoints already there are intact"
            ) from e

    def close(self) -> None:
        self.manager.close()
