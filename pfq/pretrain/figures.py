"""Pretraining figures: the loss curve per seed, and one case's reconstruction (mid-slices)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pfq.pretrain import model as fcmae

CHANNELS = ("T2w", "high-b DWI", "ADC")


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from pfq.io import atomic_write_bytes

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_losses(losses: np.ndarray, seeds: list[int], path: Path) -> None:
    """`losses`: (seeds, steps); raw per-step values and a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, losses.shape[1] + 1)
    window = max(1, losses.shape[1] // 25)
    for i, seed in enumerate(seeds):
        (line,) = ax.plot(steps, losses[i], alpha=0.25, lw=0.8)
        smooth = np.convolve(np.nan_to_num(losses[i]), np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=line.get_color(), lw=1.5, label=f"seed {seed}")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="predicting the patch mean")
    ax.set(xlabel="step", ylabel="masked-patch loss (norm-pix MSE)", title="FCMAE pretraining loss")
    ax.legend(fontsize=8)
    _save(fig, path)


def reconstruction(
    spec: fcmae.FCMAESpec, params: dict, volume: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input, masked input, reconstruction) of one (D, H, W, C) volume. With norm-pix targets the
    prediction is in per-patch normalised units: it is mapped back with the true patch's mean and
    standard deviation (as MAE's visualisations do); kept patches show the input."""
    x = jnp.asarray(volume)[None]
    mask = fcmae.random_mask(jax.random.key(seed), 1, fcmae.grid_shape(volume.shape[:3]), spec.mask_ratio)
    _, pred = fcmae.forward(spec, params, x, mask)
    if spec.norm_pix_loss:
        t = fcmae.patchify(x)
        pred = pred * jnp.sqrt(jnp.var(t, axis=-1, keepdims=True, ddof=1) + 1e-6) + jnp.mean(t, -1, keepdims=True)
    removed = fcmae.upsample(mask, fcmae.PATCH)[..., None]
    recon = fcmae.unpatchify(pred, volume.shape[-1]) * removed + x * (1 - removed)
    return np.asarray(x[0]), np.asarray((x * (1 - removed))[0]), np.asarray(recon[0])


def plot_reconstruction(spec: fcmae.FCMAESpec, params: dict, volume: np.ndarray, path: Path, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = reconstruction(spec, params, volume, seed)
    mid = volume.shape[0] // 2
    fig, axes = plt.subplots(volume.shape[-1], 3, figsize=(7.5, 2.6 * volume.shape[-1]), squeeze=False)
    for c in range(volume.shape[-1]):
        lo, hi = np.percentile(images[0][mid, :, :, c], [1, 99])
        for j, (img, title) in enumerate(zip(images, ("input", "masked input", "reconstruction"), strict=True)):
            ax = axes[c, j]
            ax.imshow(img[mid, :, :, c], cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(CHANNELS[c] if c < len(CHANNELS) else f"channel {c}", fontsize=9)
    fig.suptitle(f"FCMAE reconstruction, mid-slice {mid} (mask ratio {spec.mask_ratio:g})", fontsize=10)
    _save(fig, path)
