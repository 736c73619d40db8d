"""Multi-host runs: process start-up, global arrays from host data, gathering, and one writer.

Every process runs the same program over a global (lane, data) mesh; each builds the same host
batch deterministically and contributes only the shards its devices hold. Process 0 writes outputs.
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
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif auto:
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
    return jax.process_index() == 0


def global_array(tree, sharding):
    """Host numpy leaves (identical on every process) -> global arrays laid out by `sharding`."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), tree)


def to_host(x) -> np.ndarray:
    """A possibly multi-host sharded array as one numpy array on every process."""
    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
