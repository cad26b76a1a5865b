"""What every VAE here shares: the output record, the reparameterisation, the loss (eq. 2).

:class:`VAE` is also the contract between a model and the one training loop / scoring stages:
variants (conditional, vector-quantised, introspective) override the hooks below instead of
bringing loops of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

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


if TYPE_CHECKING:
    from bam_vae.config import TrainConfig


@dataclass
class LossParts:
    """Batch means of the per-image terms; ``total = k1 * recon + k2 * kl`` for a plain VAE.

    ``extra`` holds a variant's own terms (commitment loss, adversarial terms...), logged too.
    """

    total: Tensor
    recon: Tensor
    kl: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        base = {"loss": self.total.item(), "recon": self.recon.item(), "kl": self.kl.item()}
        return base | {k: float(v) for k, v in self.extra.items()}


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel: one pass per parameter instead of a dozen small ops. The
    same update rule, and faster for the small dense model (``bench/train_throughput.py``)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def on_device(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Each tensor moved to ``device`` (``None`` stays ``None``). Host tensors bound for a GPU
    go through pinned memory: one DMA copy instead of a staged one (the allocator keeps the
    pinned buffer until the copy is done, so it may run asynchronously)."""
    return tuple(None if t is None else _moved(t, torch.device(device)) for t in tensors)


def _moved(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def kl_per_image(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims: one value per image."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


MIN_LOG_SIGMA = -6.0  # the sigma-VAE's floor: a perfect batch must not give an infinite NLL


def recon_per_image(logits: Tensor, x: Tensor, kind: str) -> Tensor:
    """Reconstruction term summed over the 784 pixels: one value per image.

    - ``mse``: squared error, i.e. a Gaussian decoder of fixed variance 1/2 (up to a constant);
    - ``bce``: Bernoulli negative log-likelihood, on logits for numerical stability;
    - ``gaussian``: Gaussian negative log-likelihood with one variance shared by all pixels,
      set to its optimum on the batch, the mean squared error (sigma-VAE, Rybkin et al. 2021).
    """
    if kind == "bce":
        err = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return err.flatten(1).sum(dim=1)
    sq = (torch.sigmoid(logits) - x).pow(2).flatten(1)
    if kind == "mse":
        return sq.sum(dim=1)
    log_sigma = (0.5 * sq.mean().log()).clamp_min(MIN_LOG_SIGMA)
    nll = 0.5 * sq * torch.exp(-2 * log_sigma) + log_sigma + 0.5 * math.log(2 * math.pi)
    return nll.sum(dim=1)


def vae_loss_per_image(out: VAEOutput, x: Tensor, k1: float, k2: float, recon: str) -> LossParts:
    rec = recon_per_image(out.logits, x, recon)
    kl = kl_per_image(out.mu, out.logvar)
    return LossParts(total=k1 * rec + k2 * kl, recon=rec, kl=kl)


def vae_loss(out: VAEOutput, x: Tensor, k1: float, k2: float, recon: str) -> LossParts:
    """Equation (2) of the report, averaged over the batch."""
    parts = vae_loss_per_image(out, x, k1, k2, recon)
    return LossParts(parts.total.mean(), parts.recon.mean(), parts.kl.mean())


class VAE(nn.Module):
    """Gaussian VAE: subclasses provide ``encoder`` (x -> 2*z_dim) and ``decoder`` (z -> logits).

    Hooks (override in variants): ``loss``, ``configure_optimizers``, ``train_step``,
    ``on_epoch_end``, ``sample``, ``latent``.
    Labels ``y`` (int64 class indices) are passed everywhere; unconditional models ignore them.
    """

    conditional: ClassVar[bool] = False  # True: encoder and decoder see the label
    n_classes: int = 0  # a conditional model's classes (the dataset's)
    # What samplers are fitted to: "continuous" posterior means, or discrete "codes".
    latent_kind: ClassVar[str] = "continuous"
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decoder(z)

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> VAEOutput:
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar, generator)
        return VAEOutput(logits=self.decode(z, y), mu=mu, logvar=logvar, z=z)

    # -- training hooks
    def loss_per_image(self, out: VAEOutput, x: Tensor, cfg: TrainConfig) -> LossParts:
        """Per-image loss terms; robustness uses the total as the negative ELBO."""
        return vae_loss_per_image(out, x, cfg.k1, cfg.k2, cfg.recon)

    def loss(self, out: VAEOutput, x: Tensor, cfg: TrainConfig) -> LossParts:
        parts = self.loss_per_image(out, x, cfg)
        return LossParts(
            parts.total.mean(), parts.recon.mean(), parts.kl.mean(),
            {k: v.mean() for k, v in parts.extra.items()},
        )  # fmt: skip

    def configure_optimizers(self, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        return [adam(self.parameters(), cfg.lr)]

    def train_step(
        self, x: Tensor, y: Tensor, optimizers: list[torch.optim.Optimizer], cfg: TrainConfig,
        epoch: int,
    ) -> LossParts:  # fmt: skip
        """One optimisation step on a batch; ``epoch`` is 0-based (for warm-ups)."""
        (optimizer,) = optimizers
        parts = self.loss(self(x, y), x, cfg)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        return parts

    def on_epoch_end(self) -> dict[str, float]:
        """Extra per-epoch metrics (e.g. codebook usage), logged with the losses."""
        return {}

    # -- scoring hooks
    def sample(self, n: int, generator: torch.Generator, y: Tensor | None = None) -> Tensor:
        """``n`` new images in [0, 1] (on the model's device): z ~ N(0, I), decoded.

        ``generator`` is a CPU generator: every device decodes the same latents."""
        z = torch.randn(n, self.z_dim, generator=generator)
        return torch.sigmoid(self.decode(*on_device(self.device, z, y)))

    def latent(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """What the t-SNE stage embeds: the posterior mean."""
        return self.encode(x, y)[0]

    @torch.no_grad()
    def latents(self, images: Tensor, labels: Tensor, batch: int = 1000) -> Tensor:
        """``latent`` of many images, ``batch`` at a time on the model's device: images uint8
        (N x 28 x 28, moved there once as bytes), labels int64 (N; ignored by unconditional
        models). Returns float32, N x D, on the CPU (posterior means; VQ-VAE's quantised grid
        flattened). What samplers are fitted to, t-SNE embeds and ``inspect`` walks through."""
        return self._batched(self.latent, images, labels, batch).flatten(1)

    @torch.no_grad()
    def reconstructions(self, images: Tensor, labels: Tensor, batch: int = 1000) -> Tensor:
        """``reconstruct`` of many images, as :meth:`latents` takes them. Returns float32,
        N x 1 x 28 x 28, in [0, 1], on the CPU: what REC scores (Ghosh et al. 2020)."""
        return self._batched(self.reconstruct, images, labels, batch)

    def _batched(self, fn, images: Tensor, labels: Tensor, batch: int) -> Tensor:
        x, y = images.to(self.device), labels.to(self.device)
        parts = [fn(x[i : i + batch].float().div(255.0).unsqueeze(1), y[i : i + batch])
                 for i in range(0, len(x), batch)]  # fmt: skip
        return torch.cat(parts).cpu()

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Deterministic reconstruction (from the posterior mean) in [0, 1]."""
        return torch.sigmoid(self.decode(self.latent(x, y), y))
