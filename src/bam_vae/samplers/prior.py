"""``prior``: the prior the model was trained under -- z ~ N(0, I), the report's setting;
uniform independent codes for ``vqvae``. Nothing to fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bam_vae.samplers.base import LatentSampler

if TYPE_CHECKING:
    from bam_vae.models import VAE


class PriorSampler(LatentSampler):
    kind = "prior"
    fits = ("continuous", "codes")

    def fit(self, latents: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return {}

    def draw(self, vae: VAE, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        return vae.sample(n, generator, labels)
