"""FCMAE (sparse, MinkowskiEngine) encoder weights -> dense upstream names and PyTorch layouts.

Reproduces upstream `remap_checkpoint_keys` (docs/checkpoints.md, "B: FCMAE pretraining checkpoint"). MinkowskiEngine
flattens a cubic kernel with the *first* spatial axis fastest (k = a + ks*b + ks^2*c for offsets along
D, H, W), so a C-order reshape yields (c, b, a): the spatial axes must be reversed.
"""

from __future__ import annotations

import numpy as np

DROP_SUBSTRINGS = ("decoder", "mask_token", "proj", "pred")
LAST_DOWNSAMPLE = "downsample_layers.3.1.weight"  # 1x1x1 stride-1: MinkowskiEngine stores (in, out)


def cube_side(volume: int) -> int | None:
    side = round(volume ** (1 / 3))
    return side if side**3 == volume else None


def sparse_conv_to_dense(v: np.ndarray) -> np.ndarray:
    """(ks^3, in, out) -> torch Conv3d weight (out, in, ks, ks, ks)."""
    ks = cube_side(v.shape[0])
    assert ks is not None
    return v.reshape(ks, ks, ks, v.shape[1], v.shape[2]).transpose(4, 3, 2, 1, 0)


def sparse_depthwise_to_dense(v: np.ndarray) -> np.ndarray:
    """(ks^3, C) -> torch depthwise Conv3d weight (C, 1, ks, ks, ks)."""
    ks = cube_side(v.shape[0])
    assert ks is not None
    return v.reshape(ks, ks, ks, v.shape[1]).transpose(3, 2, 1, 0)[:, None]


def _kernel_problem(name: str, v: np.ndarray) -> str | None:
    """`name` is the renamed (`.weight`) key."""
    if name.endswith(LAST_DOWNSAMPLE):
        return None if v.ndim == 2 else f"{name}: expected a 2-D (in, out) kernel, got shape {v.shape}"
    if v.ndim not in (2, 3) or cube_side(v.shape[0]) is None:
        return f"{name}: sparse kernel shape {v.shape} is not (k^3, C) or (k^3, in, out)"
    return None


def remap_sparse(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Returns (dense encoder state dict without prefix, dropped keys, problems)."""
    dropped = [k for k in state if any(s in k for s in DROP_SUBSTRINGS)]
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for key, v in state.items():
        if key in dropped:
            continue
        name = key[len("encoder.") :] if key.startswith("encoder.") else key
        if name.endswith(".kernel"):
            name = name[: -len(".kernel")] + ".weight"
            problem = _kernel_problem(name, v)
            if problem:
                problems.append(problem)
                continue
            if name.endswith(LAST_DOWNSAMPLE):
                v = v.T[:, :, None, None, None]
            elif v.ndim == 2:
                v = sparse_depthwise_to_dense(v)
            else:
                v = sparse_conv_to_dense(v)
        elif ".ln." in f".{name}" or ".linear." in f".{name}":
            name = ".".join(p for p in name.split(".") if p not in ("ln", "linear"))
        # (1, C) sparse biases and GRN parameters; other shapes are left for the shape check to report
        if name.endswith("bias") and v.ndim == 2 and v.shape[0] == 1:
            v = v.reshape(-1)
        if "grn" in name and v.ndim == 2 and v.shape[0] == 1:
            v = v.reshape(1, 1, 1, 1, -1)
        out[name] = np.ascontiguousarray(v)
    return out, dropped, problems
