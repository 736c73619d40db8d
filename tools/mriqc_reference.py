"""Golden values for pfq's IQMs that follow MRIQC's formulas, computed by MRIQC's own functions.

MRIQC pins numpy < 2, so it cannot live beside pfq (jax needs numpy >= 2); run this once in its own
environment and commit the JSON that `tests/test_iqm.py` compares against:

    python3 -m venv /tmp/venv-mriqc && /tmp/venv-mriqc/bin/pip install "mriqc==24.0.2" "numpy<2"
    /tmp/venv-mriqc/bin/python tools/mriqc_reference.py tests/data/mriqc_golden.json

The test volume is analytic (no random generator, whose streams could differ between numpy versions):
smooth anatomy-like structure, a deterministic hash as "noise", a zero-padded frame and clipped voxels.
This file must import nothing but numpy (and mriqc when run as a script).
"""

from __future__ import annotations

import json
import sys

import numpy as np

SHAPE = (12, 24, 20)
PAD = 2  # zero slabs on every side along H and W: padding, outside the valid region


def reference_volume() -> np.ndarray:
    """(D, H, W) float64 test volume: positive inside, zero padding around, a few clipped zeros inside."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    smooth = 100.0 + 40.0 * np.sin(0.5 * x) * np.cos(0.3 * y) + 25.0 * np.exp(-((y - 12) ** 2 + (x - 10) ** 2) / 30.0)
    hashed = np.sin(12.9898 * x + 78.233 * y + 37.719 * z) * 43758.5453
    noise = 8.0 * (hashed - np.floor(hashed) - 0.5)
    vol = smooth + noise + 2.0 * z
    vol[:, :PAD, :] = 0.0
    vol[:, -PAD:, :] = 0.0
    vol[:, :, :PAD] = 0.0
    vol[:, :, -PAD:] = 0.0
    vol[5, 10:12, 8:10] = 0.0  # clipped voxels inside the valid region are data
    return vol


def frame_mask(vol: np.ndarray) -> np.ndarray:
    """1 on the padding frame (what pfq calls outside the valid region), as MRIQC's framemask."""
    mask = np.ones(vol.shape, dtype=np.uint8)
    mask[:, PAD:-PAD, PAD:-PAD] = 0
    return mask


def main(out: str) -> None:
    from importlib.metadata import version

    from mriqc.qc import anatomical

    vol = reference_volume()
    frame = frame_mask(vol)
    inside = vol[frame == 0]
    mu = float(np.median(inside[inside > 0.05 * np.percentile(inside, 98)]))
    golden = {
        "mriqc_version": version("mriqc"),
        "numpy_version": np.__version__,
        # MRIQC 24 rounds EFC to `decimals` (4 by default); ask for all of them.
        "efc_framemask": anatomical.efc(vol, framemask=frame, decimals=15),
        "efc_no_framemask": anatomical.efc(vol, decimals=15),
        "efc_framemask_default_rounding": anatomical.efc(vol, framemask=frame),
        "wm2max_median_foreground": anatomical.wm2max(inside, mu),
        "foreground_median": mu,
    }
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
    print(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/mriqc_golden.json")
