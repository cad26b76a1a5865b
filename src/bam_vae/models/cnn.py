"""The report's convolutional VAE (section 2.2): two strided convs per side."""

from __future__ import annotations

from torch import nn

from bam_vae.models.base import VAE


class CNNVAE(VAE):
    def __init__(self, z_dim: int, channels: list[int]):
        super().__init__(z_dim)
        c1, c2 = channels
        flat = c2 * 7 * 7
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(flat, 2 * z_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, flat),
            nn.ReLU(),
            nn.Unflatten(1, (c2, 7, 7)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # 14 -> 28
        )
