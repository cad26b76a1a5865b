"""PNG figures, written atomically (a failed run never leaves a half-drawn file).

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot: no global state, and half
the import time); image grids follow ``torchvision.utils.make_grid`` (tested against it)
without importing torchvision, whose import alone costs about as much as torch's
(``bench/startup.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.figure import Figure
from PIL import Image

from bam_vae.files import atomic_path


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """``(figure, axes)`` as ``pyplot.subplots`` returns them; ``figsize`` goes to the figure."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def colormap(name: str) -> matplotlib.colors.Colormap:
    return matplotlib.colormaps[name]


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0):
    """Images (N x 1 x H x W, floats) tiled ``nrow`` per row with ``padding`` pixels of
    ``pad_value`` around each: a 3 x H' x W' tensor laid out as ``torchvision.utils.make_grid``
    lays out single-channel images (a single image comes back unpadded, as there)."""
    n, _, h, w = images.shape
    if n == 1:
        return images[0].expand(3, h, w).clone()
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((3, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * cell_h + padding, x * cell_w + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def image_rows(rows: list[torch.Tensor], labels: list[str], title: str, path: Path) -> None:
    """Rows of 28x28 images (same count per row), each row named on the left."""
    n_cols = len(rows[0])
    grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=n_cols, padding=2, pad_value=1.0)
    fig, ax = subplots(figsize=(max(4.0, n_cols * 0.45), len(rows) * 0.55 + 0.6))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([30 * i + 16 for i in range(len(rows))], labels)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def image_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """All images as one plain grid, one pixel per pixel (e.g. 32 x 32 for 1024 samples),
    saved as ``torchvision.utils.save_image`` saves it (8-bit RGB PNG)."""
    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="png")


def image_panels(panels: list[tuple[str, torch.Tensor]], title: str, path: Path) -> None:
    """Square grids of images side by side, each under its name (e.g. one per sampler)."""
    fig, axes = subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels, strict=True):
        nrow = max(1, round(len(images) ** 0.5))
        grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
