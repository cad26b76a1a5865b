"""The report's convolutional VAE (section 2.2): two strided convs per side."""

from __future__ import annotations

from torch import nn

from bam_vae.models.base import VAE


def conv_features(c1: int, c2: int) -> list[nn.Module]:
    """Two strided 4x4 convolutions, 28x28 -> c2 x 7 x 7, flattened.

    The last ReLU comes after the flatten (the same function): the flatten's gradient is
    row-major, and a ReLU whose output is channels-last (bf16) would take its backward in the
    other layout, much slower than with matching layouts (``bench/train_throughput.py``)."""
    return [
        nn.Conv2d(1, c1, 4, stride=2, padding=1),  # 28 -> 14
        nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 14 -> 7
        nn.Flatten(),
        nn.ReLU(),
    ]


def deconv_decoder(n_in: int, c1: int, c2: int) -> list[nn.Module]:
    """A dense layer to c2 x 7 x 7, then two strided transposed convolutions back to 28x28."""
    return [
        nn.Linear(n_in, c2 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (c2, 7, 7)),
        nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # 7 -> 14
        nn.ReLU(),
        nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # 14 -> 28
    ]


class CNNVAE(VAE):
    def __init__(self, z_dim: int, channels: list[int]):
        super().__init__(z_dim)
        c1, c2 = channels
        self.encoder = nn.Sequential(*conv_features(c1, c2), nn.Linear(c2 * 7 * 7, 2 * z_dim))
        self.decoder = nn.Sequential(*deconv_decoder(z_dim, c1, c2))
