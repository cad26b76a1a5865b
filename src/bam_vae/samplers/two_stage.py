"""``two-stage``: a second, small VAE fitted to the posterior means (Dai & Wipf 2019).

The first VAE's aggregate posterior q(z) is not N(0, I); a second VAE u -> z learns it, and
new latents are drawn as z = decoder(u), u ~ N(0, I). As in the paper, its decoder is a
Gaussian with a learned variance gamma (which lets it fit q(z) sharply), and u has the size of
z. Conditional models give it the class as a one-hot input on both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam_vae.config import TwoStageConfig
from bam_vae.models.base import kl_per_image, reparameterize
from bam_vae.samplers.base import NetSampler


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out),
    )  # fmt: skip


class SecondStage(nn.Module):
    def __init__(self, dim: int, hidden: int, n_labels: int) -> None:
        super().__init__()
        self.n_labels = n_labels
        self.encoder = mlp(dim + n_labels, hidden, 2 * dim)
        self.decoder = mlp(dim + n_labels, hidden, dim)
        self.log_gamma = nn.Parameter(torch.zeros(()))  # gamma = 1 at the start, as in the paper

    def _with(self, v: Tensor, labels: Tensor | None) -> Tensor:
        if not self.n_labels:
            return v
        return torch.cat([v, F.one_hot(labels, self.n_labels).to(v)], dim=1)

    def loss(self, z: Tensor, labels: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Negative ELBO per latent, averaged: Gaussian NLL with variance gamma, plus KL."""
        mu, logvar = self.encoder(self._with(z, labels)).chunk(2, dim=1)
        u = reparameterize(mu, logvar, generator)
        err = (self.decoder(self._with(u, labels)) - z).pow(2).sum(1)
        nll = 0.5 * (err / self.log_gamma.exp() + z.shape[1] * self.log_gamma)
        return (nll + kl_per_image(mu, logvar)).mean()

    def decode(self, u: Tensor, labels: Tensor | None) -> Tensor:
        return self.decoder(self._with(u, labels))


class TwoStageSampler(NetSampler):
    config_type = TwoStageConfig
    kind = "two-stage"

    def _build(self, dim: int) -> SecondStage:
        return SecondStage(dim, self.cfg.hidden, self.n_classes if self.conditional else 0)

    def _loss(self, net: SecondStage, z: Tensor, labels: Tensor | None) -> Tensor:
        return net.loss(z, labels, None)

    def _decode(self, u: Tensor, labels: Tensor | None) -> Tensor:
        return self.net.decode(u, labels)

    def _report(self, net: SecondStage, history_row: dict[str, float]) -> dict[str, float]:
        gamma = net.log_gamma.detach().exp().item()
        return {"two_stage_loss": history_row["train_loss"], "two_stage_gamma": gamma}
