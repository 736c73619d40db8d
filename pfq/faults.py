"""Deterministic fault injection for the reliability tests; a no-op unless `PFQ_FAULT_POINT` is set.

    PFQ_FAULT_POINT=NAME:COUNT[:ACTION]

The COUNT-th time this process reaches `maybe_fail(NAME)` (for points inside the training loop:
when it reaches training step COUNT), ACTION happens: `kill` (default) sends
SIGKILL to the process itself, as a preemption would; `enospc` / `eio` raise the matching OSError, as
a full disk or a failing device would. A line naming the point goes to stderr first, so a test can
tell the fault fired. Named points (see the callers): `cache_write` (a preprocessed volume written,
not yet renamed into the cache), `train_step`, `checkpoint_save`, `checkpoint_async`,
`checkpoint_wait`, `predict_batch`, `evaluate`, `report`, `write:<file name>` between writing an
output's temporary file and renaming it into place, and `plan_compile:<topology>` before `pfq.plan`
compiles a layout.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

ACTIONS = ("kill", "enospc", "eio")

_target: tuple[str, int, str] | None = None
_hits: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, str]:
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[2] in ACTIONS:
        name, count, action = parts
    else:
        name, _, count = spec.rpartition(":")
        action = "kill"
    if not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"PFQ_FAULT_POINT={spec!r}: expected NAME:COUNT[:{'|'.join(ACTIONS)}] with COUNT >= 1")
    return name, int(count), action


def configure(spec: str | None) -> None:
    """Arm one fault point (None disarms); `PFQ_FAULT_POINT` arms it at import."""
    global _target
    _target = parse(spec) if spec else None
    _hits.clear()


def maybe_fail(name: str, step: int | None = None) -> None:
    """Fire the armed fault if this is its point: COUNT is the training `step` where one is given
    (so `train_step:3` means "after step 3" however far a resumed run started), else the hit count."""
    if _target is None or name != _target[0]:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if (step if step is not None else _hits[name]) != _target[1]:
        return
    action = _target[2]
    print(f"pfq.faults: {action} at {name}:{_target[1]}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {name})")


configure(os.environ.get("PFQ_FAULT_POINT"))
