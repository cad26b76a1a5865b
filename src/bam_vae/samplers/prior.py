"""``prior``: the model's own prior -- z ~ N(0, I), the report's setting; for ``vqvae``, its
PixelCNN over codes. Nothing to fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bam_vae.samplers.base import LatentSampler

if TYPE_CHECKING:
    from bam_vae.models import VAE


class PriorSampler(LatentSampler):
    kind = "prior"

    def fit(self, latents: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return {}

    def draw(self, vae: VAE, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        return vae.sample(n, generator, labels)
