"""What every VAE here shares: the output record, the reparameterisation, the loss (eq. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VAEOutput:
    """One forward pass: decoder logits and the posterior q(z|x) = N(mu, exp(logvar))."""

    logits: Tensor  # N x 1 x 28 x 28, before the sigmoid
    mu: Tensor  # N x z_dim
    logvar: Tensor  # N x z_dim
    z: Tensor  # N x z_dim, the sample the decoder saw

    @property
    def recon(self) -> Tensor:
        return torch.sigmoid(self.logits)


@dataclass
class LossParts:
    """Batch means of the per-image terms; ``total = k1 * recon + k2 * kl``."""

    total: Tensor
    recon: Tensor
    kl: Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "recon": self.recon.item(), "kl": self.kl.item()}


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def kl_per_image(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims: one value per image."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def recon_per_image(logits: Tensor, x: Tensor, kind: str) -> Tensor:
    """Reconstruction error summed over the 784 pixels: one value per image."""
    if kind == "mse":
        err = (torch.sigmoid(logits) - x).pow(2)
    else:  # "bce", on logits for numerical stability
        err = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return err.flatten(1).sum(dim=1)


def vae_loss_per_image(out: VAEOutput, x: Tensor, k1: float, k2: float, recon: str) -> LossParts:
    rec = recon_per_image(out.logits, x, recon)
    kl = kl_per_image(out.mu, out.logvar)
    return LossParts(total=k1 * rec + k2 * kl, recon=rec, kl=kl)


def vae_loss(out: VAEOutput, x: Tensor, k1: float, k2: float, recon: str) -> LossParts:
    """Equation (2) of the report, averaged over the batch."""
    parts = vae_loss_per_image(out, x, k1, k2, recon)
    return LossParts(parts.total.mean(), parts.recon.mean(), parts.kl.mean())


class VAE(nn.Module):
    """Gaussian VAE: subclasses provide ``encoder`` (x -> 2*z_dim) and ``decoder`` (z -> logits)."""

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator)
        return VAEOutput(logits=self.decode(z), mu=mu, logvar=logvar, z=z)


class Generator(nn.Module):
    """The decoder as a standalone image generator (z -> pixels in [0, 1]).

    This is what gets exported (torch.export / MLflow ``pt2``) and registered: it needs no
    project code to load, and it is all that generation from a registry URI needs.
    """

    def __init__(self, vae: VAE):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))
