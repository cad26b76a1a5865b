"""The report's dense VAE (section 2.3): three dense layers per side."""

from __future__ import annotations

from torch import nn

from bam_vae.models.base import VAE

PIXELS = 28 * 28


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DenseVAE(VAE):
    def __init__(self, z_dim: int, hidden: list[int]):
        super().__init__(z_dim)
        self.encoder = nn.Sequential(nn.Flatten(), mlp([PIXELS, *hidden, 2 * z_dim]))
        self.decoder = nn.Sequential(
            mlp([z_dim, *reversed(hidden), PIXELS]), nn.Unflatten(1, (1, 28, 28))
        )
