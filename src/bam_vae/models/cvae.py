"""Conditional VAE (Sohn et al. 2015) on the CNN backbone: the one-hot digit enters both sides.

Encoder: conv features of x, concatenated with one-hot(y), a linear layer -> (mu, logvar).
Decoder: concat(z, one-hot(y)) -> the CNN decoder -> logits. The loss is the base class's
k1 * recon + k2 * KL, with the KL against the (label-independent) prior N(0, I).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam_vae.models.base import VAE, on_device
from bam_vae.models.cnn import conv_features, deconv_decoder

N_CLASSES = 10


def one_hot(y: Tensor | None) -> Tensor:
    if y is None:
        raise ValueError("CVAE needs the digit labels y (int64, shape N) for encode and decode")
    return F.one_hot(y.long(), N_CLASSES).float()


class CVAE(VAE):
    conditional: ClassVar[bool] = True

    def __init__(self, z_dim: int, channels: list[int]):
        super().__init__(z_dim)
        c1, c2 = channels
        flat = c2 * 7 * 7
        # Unlike the base contract, ``encoder`` stops at the conv features: the label joins
        # them in ``posterior``, so encoder(x) alone is not (mu, logvar).
        self.encoder = nn.Sequential(*conv_features(c1, c2))
        self.posterior = nn.Linear(flat + N_CLASSES, 2 * z_dim)
        # The decoder takes [z, one-hot(y)] as one vector, so the base Generator exports it.
        self.decoder = nn.Sequential(*deconv_decoder(z_dim + N_CLASSES, c1, c2))

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = torch.cat([self.encoder(x), one_hot(y).to(x)], dim=1)
        mu, logvar = self.posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decoder(generator_input(z, y))

    def sample(self, n: int, generator: torch.Generator, y: Tensor | None = None) -> Tensor:
        """``n`` images of digits ``y``; without labels, balanced ones (0, 1, ..., 9, 0, ...)."""
        z = torch.randn(n, self.z_dim, generator=generator)
        if y is None:
            y = torch.arange(n) % N_CLASSES
        return torch.sigmoid(self.decode(*on_device(self.device, z, y)))


def generator_input(z: Tensor, y: Tensor) -> Tensor:
    """What the CVAE's decoder takes: [z, one-hot(y)], float32 (N x (z_dim + 10))."""
    return torch.cat([z, one_hot(y).to(z)], dim=1)
