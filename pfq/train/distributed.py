"""Multi-host runs: process start-up, global arrays from host data, gathering, and one writer.

Every process runs the same program over a global (lane, data) mesh; each loads and augments only
the block of the global batch that its devices hold (`local_box`), and the global batch is assembled
from those blocks (`global_batch`, with `jax.make_array_from_process_local_data`). Process 0 writes outputs.
Launch: on a TPU VM pod `jax.distributed.initialize()` finds its peers by itself (`--distributed`);
elsewhere pass the coordinator explicitly (see README, "Several hosts").
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False) -> None:
    """Start jax.distributed when asked: explicit coordinator (flags or PFQ_COORDINATOR,
    PFQ_NUM_PROCESSES, PFQ_PROCESS_ID), or `auto` for cluster environments JAX detects (TPU pods,
    SLURM, Open MPI)."""
    coordinator = coordinator or os.environ.get("PFQ_COORDINATOR", "")
    if coordinator:
        num_processes = num_processes or int(os.environ["PFQ_NUM_PROCESSES"])
        process_id = process_id if process_id >= 0 else int(os.environ["PFQ_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()
    else:
        return
    log.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_writer() -> bool:
    return jax.process_index() == 0


def local_box(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The smallest (axis 0, axis 1) block of a `shape` array that holds every shard this process's
    devices address; on one process, everything. With devices in process order (as `lanes.make_mesh`
    lays them out) it is exactly this process's part (e.g. its lanes, or its slots of every lane),
    which is what `global_batch` expects."""
    indices = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
    if not indices:
        raise ValueError(
            f"process {jax.process_index()} holds no device of the (lane, data) mesh, so its devices "
            "would idle; make the lanes per group or the batch size divisible by the process count"
        )
    box = []
    for axis in (0, 1):
        ranges = [idx[axis].indices(shape[axis])[:2] for idx in indices]
        box.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
    return box[0], box[1]


def global_batch(tree, sharding: jax.sharding.Sharding, lead_shape: tuple[int, int]):
    """Host numpy leaves holding this process's `local_box` of global arrays whose first two axes are
    `lead_shape` -> global arrays laid out by `sharding` (one process: a plain device_put)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, tuple(lead_shape) + x.shape[2:]), tree
    )


def to_host(x) -> np.ndarray:
    """A possibly multi-host sharded array as one numpy array on every process."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
