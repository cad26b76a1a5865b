"""PNG figures, written atomically (a failed run never leaves a half-drawn file)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from bam_vae.files import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def image_rows(rows: list[torch.Tensor], labels: list[str], title: str, path: Path) -> None:
    """Rows of 28x28 images (same count per row), each row named on the left."""
    n_cols = len(rows[0])
    grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=n_cols, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(max(4.0, n_cols * 0.45), len(rows) * 0.55 + 0.6))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([30 * i + 16 for i in range(len(rows))], labels)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def image_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """All images as one plain grid, one pixel per pixel (e.g. 32 x 32 for 1024 samples)."""
    with atomic_path(path) as tmp:
        save_image(images.clamp(0, 1), tmp, nrow=nrow, padding=1, pad_value=1.0, format="png")


def image_panels(panels: list[tuple[str, torch.Tensor]], title: str, path: Path) -> None:
    """Square grids of images side by side, each under its name (e.g. one per sampler)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels, strict=True):
        nrow = max(1, round(len(images) ** 0.5))
        grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
