"""Matplotlib figures, each written atomically to a PNG path. Images are (N, 3, H, W) in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from atari_vae.files import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def training_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Total, reconstruction and KL loss per epoch, train vs validation, plus validation PSNR."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, term in zip(axes, ("loss", "recon", "kl")):
        ax.plot(epochs, [row[f"train_{term}"] for row in history], label="train")
        ax.plot(epochs, [row[f"val_{term}"] for row in history], label="validation")
        ax.set(title={"loss": "total loss", "recon": "reconstruction", "kl": "KL (nats)"}[term],
               xlabel="epoch")
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[3].plot(epochs, [row["val_psnr"] for row in history], label="model")
    if "baseline_psnr" in history[0]:
        axes[3].axhline(history[0]["baseline_psnr"], ls="--", c="gray", label="mean frame")
    axes[3].set(title="validation PSNR (dB)", xlabel="epoch")
    axes[3].legend()
    return _save(fig, path)


def reconstructions(originals: torch.Tensor, recons: torch.Tensor, path: str | Path,
                    title: str = "", labels: Sequence[str] | None = None) -> Path:
    """Rows: originals, reconstructions, and |error| maps (bright = missed objects)."""
    n = len(originals)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    errors = (originals.float() - recons.float()).abs().amax(dim=1)
    for i in range(n):
        axes[0, i].imshow(_hwc(originals[i]), interpolation="nearest")
        axes[1, i].imshow(_hwc(recons[i]), interpolation="nearest")
        axes[2, i].imshow(errors[i].cpu().numpy(), cmap="magma", vmin=0, vmax=1,
                          interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("original", "reconstruction", "|error|")):
        axes[row, 0].set_ylabel(label)
    for ax, label in zip(axes[0], labels or ()):
        ax.set_title(label, fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def image_grid(images: torch.Tensor, path: str | Path, title: str = "",
               ncols: int = 8) -> Path:
    """A grid of images, e.g. decoded prior samples."""
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(_hwc(image), interpolation="nearest")
    fig.suptitle(title)
    return _save(fig, path)


def traversals(rows: torch.Tensor, values: Sequence[float], dims: Sequence[int],
               path: str | Path) -> Path:
    """(len(dims), len(values), 3, H, W): decoded frames moving one latent dim at a time."""
    fig, axes = plt.subplots(len(dims), len(values), figsize=(1.4 * len(values),
                                                             1.4 * len(dims)), squeeze=False)
    for r, dim in enumerate(dims):
        for c, value in enumerate(values):
            axes[r, c].imshow(_hwc(rows[r, c]), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"{value:+.1f}σ", fontsize=8)
        axes[r, 0].set_ylabel(f"z[{dim}]")
    fig.suptitle("latent traversals from a held-out frame (most active dims)")
    return _save(fig, path)


def latent_scatter(points_2d: np.ndarray, color: np.ndarray, path: str | Path,
                   color_label: str, title: str) -> Path:
    """A 2-D projection of latent means, colored by e.g. time in the episode."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(points_2d[:, 0], points_2d[:, 1], c=color, s=6, cmap="viridis", alpha=0.8)
    fig.colorbar(sc, ax=ax, label=color_label)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return _save(fig, path)


def latent_panels(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path,
                  color_label: str, title: str) -> Path:
    """One scatter per (title, points_2d, color) panel on shared axes, e.g. one per game."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 5), squeeze=False,
                             sharex=True, sharey=True)
    vmax = max(float(color.max()) for _, _, color in panels)
    for ax, (name, points, color) in zip(axes[0], panels):
        sc = ax.scatter(points[:, 0], points[:, 1], c=color, s=6, cmap="viridis", alpha=0.8,
                        vmin=0, vmax=vmax)
        ax.set(title=name, xlabel="PC 1")
    axes[0, 0].set_ylabel("PC 2")
    fig.colorbar(sc, ax=list(axes[0]), label=color_label)
    fig.suptitle(title)
    return _save(fig, path)


def policy_strip(frames: torch.Tensor, recons: torch.Tensor, actions: Sequence[str],
                 path: str | Path, title: str = "") -> Path:
    """Columns of one episode: the 64x64 frame the controller saw, its reconstruction, and
    the action chosen (column title)."""
    n = len(frames)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(_hwc(frames[i]), interpolation="nearest")
        axes[1, i].imshow(_hwc(recons[i]), interpolation="nearest")
        axes[0, i].set_title(actions[i], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("frame (64x64)")
    axes[1, 0].set_ylabel("reconstruction")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
