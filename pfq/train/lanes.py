"""Lanes: independent finetuning runs stacked on a leading axis and trained by one compiled step.

A lane is one (finetune HQ ratio, initialisation, train size, seed). Lanes whose programs are
identical (same init kind, same model and batch shapes) form a group that is vmapped together; a
lane's budget only changes its data stream. The (`lane`, `data`) mesh spreads lanes over devices
when there are enough and splits each lane's batch otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclass(frozen=True)
class Lane:
    index: int
    finetune_hq_ratio: float
    init: str  # 'scratch' or a converted checkpoint directory
    train_size: int
    seed: int

    def as_row(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        from pfq.baseline import BASELINE_INIT

        init = self.init if self.init in ("scratch", BASELINE_INIT) else "pretrained"
        return f"r{self.finetune_hq_ratio:g}-{init}-n{self.train_size}-s{self.seed}"


def make_lanes(finetune_hq_ratios, inits, train_sizes, seeds) -> list[Lane]:
    for r in finetune_hq_ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"finetune HQ ratio {r} is outside [0, 1]")
    lanes = []
    for init in inits:
        for size in train_sizes:
            for ratio in finetune_hq_ratios:
                for seed in seeds:
                    lanes.append(Lane(len(lanes), float(ratio), str(init), int(size), int(seed)))
    return lanes


def group_lanes(lanes: list[Lane], max_size: int = 0) -> list[list[Lane]]:
    """Lanes that share one compiled program: everything but data and seeds is equal within a
    group. Scratch and pretrained lanes have identical shapes, but they are kept apart so a
    pretrained group can be initialised from one checkpoint. `max_size` > 0 splits each init's
    lanes into groups of at most that many (trained one after another), so that a group fits in
    the devices' memory (`python -m pfq.plan` sizes it)."""
    groups: dict[str, list[Lane]] = {}
    for lane in lanes:
        groups.setdefault(lane.init, []).append(lane)
    if max_size <= 0:
        return list(groups.values())
    return [g[i : i + max_size] for g in groups.values() for i in range(0, len(g), max_size)]


def make_mesh(num_lanes: int, batch_size: int, devices=None) -> Mesh:
    """A (lane, data) mesh: as many devices on `lane` as divide the lane count, the rest on `data`
    (as many as divide the batch); devices that fit neither are left idle."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    lane_axis = math.gcd(num_lanes, n)
    data_axis = math.gcd(batch_size, n // lane_axis)
    used = np.array(devices[: lane_axis * data_axis]).reshape(lane_axis, data_axis)
    return Mesh(used, ("lane", "data"))


def lane_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("lane"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("lane", "data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the evaluation batch all lanes of a group predict)."""
    return NamedSharding(mesh, P())
