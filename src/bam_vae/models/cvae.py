"""Conditional VAE (Sohn et al. 2015) on the CNN backbone: the one-hot class enters both sides.

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
from bam_vae.models.cnn import conv_features, deconv_decoder, feature_size


def one_hot(y: Tensor | None, n_classes: int) -> Tensor:
    if y is None:
        raise ValueError("CVAE needs the class labels y (int64, shape N) for encode and decode")
    return F.one_hot(y.long(), n_classes).float()


class CVAE(VAE):
    conditional: ClassVar[bool] = True

    def __init__(
        self, z_dim: int, channels: list[int], n_classes: int = 10, batch_norm: bool = False
    ):
        super().__init__(z_dim)
        self.n_classes = n_classes
        flat = channels[-1] * feature_size(channels) ** 2
        # Unlike the base contract, ``encoder`` stops at the conv features: the label joins
        # them in ``posterior``, so encoder(x) alone is not (mu, logvar).
        self.encoder = nn.Sequential(*conv_features(channels, batch_norm))
        self.posterior = nn.Linear(flat + n_classes, 2 * z_dim)
        # The decoder takes [z, one-hot(y)] as one vector, so the base Generator exports it.
        self.decoder = nn.Sequential(*deconv_decoder(z_dim + n_classes, channels, batch_norm))

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = torch.cat([self.encoder(x), one_hot(y, self.n_classes).to(x)], dim=1)
        mu, logvar = self.posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decoder(generator_input(z, y, self.n_classes))

    def sample(self, n: int, generator: torch.Generator, y: Tensor | None = None) -> Tensor:
        """``n`` images of classes ``y``; without labels, balanced ones (0, 1, ..., K-1, 0, ...)."""
        z = torch.randn(n, self.z_dim, generator=generator)
        if y is None:
            y = torch.arange(n) % self.n_classes
        return torch.sigmoid(self.decode(*on_device(self.device, z, y)))


def generator_input(z: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """What the CVAE's decoder takes: [z, one-hot(y)], float32 (N x (z_dim + n_classes))."""
    return torch.cat([z, one_hot(y, n_classes).to(z)], dim=1)
