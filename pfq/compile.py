"""Compiling a lowered program on a thread with a large native stack.

libtpu's compiler recursed past the main thread's usual 8 MiB stack and killed the process with a
segmentation fault when compiling the real-size train step for v4 and v5p (jax 0.10.2, libtpu
0.0.42.1, megacore chips); the same compile finished with `ulimit -s unlimited`. A thread's stack is
set when it starts, so every compile of a whole step runs on a fresh thread with `STACK_BYTES`.
"""

from __future__ import annotations

import threading
from typing import Any

STACK_BYTES = 1 << 30  # address space only: pages are touched as deep as the compiler recurses


def compile_lowered(lowered: Any) -> Any:
    """`lowered.compile()` on a thread with a `STACK_BYTES` stack; its exception is re-raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["compiled"] = lowered.compile()
        except BaseException as e:  # noqa: BLE001 - handed to the caller unchanged
            outcome["error"] = e

    previous = threading.stack_size(STACK_BYTES)
    try:
        # A daemon thread, so that Ctrl-C ends the process instead of waiting for a long compile.
        thread = threading.Thread(target=run, name="pfq-compile", daemon=True)
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["compiled"]
