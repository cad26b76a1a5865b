"""Soft-IntroVAE (Daniel & Tamar, CVPR 2021): the report's CNN VAE trained introspectively.

The encoder doubles as the discriminator: it raises the ELBO of real images and, through a
soft exponential, lowers the ELBO of generated images; the decoder in turn makes images the
encoder scores well. Same networks as :class:`CNNVAE`, only the training hooks change;
sampling, latents and the exported generator are the base defaults (z ~ N(0, I), decoded).

The weights come from ``model.intro`` (defaults: the official MNIST settings), not
``train.k1/k2``: ``beta_rec``/``beta_kl`` weigh the real-data ELBO everywhere, also in the
per-image loss that evaluation and robustness score. With the defaults that loss is the plain
negative ELBO (weights 1/1), so ``loss`` is twice the report's 0.5/0.5 loss for the same
``recon`` and ``kl``; compare those two across architectures.

Paper, Sec. 4 (ELBO to be maximised, s a scale, alpha = 2, "fakes" D(z), z ~ N(0, I)):

    L_E(x, z) = s * ELBO(x) - 1/alpha * exp(alpha * s * ELBO(D(z)))
    L_D(x, z) = s * ELBO(x) + gamma * ELBO(D(z))

As in Algorithm 1 and the official code (taldatech/soft-intro-vae-pytorch,
``train_soft_intro_vae.py``), reconstructions D(E(x)) count as fakes next to D(z), the two are
averaged, and the fakes' ELBO weighs KL by ``beta_neg`` for the encoder and by ``beta_kl``
(reconstruction by ``gamma_r``) for the decoder. Both are written below as losses to minimise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bam_vae.models.base import (
    LossParts,
    VAEOutput,
    adam,
    kl_per_image,
    recon_per_image,
    reparameterize,
    vae_loss_per_image,
)
from bam_vae.models.cnn import CNNVAE

if TYPE_CHECKING:
    from bam_vae.config import IntroConfig, TrainConfig


class SoftIntroVAE(CNNVAE):
    def __init__(
        self, z_dim: int, channels: list[int], intro: IntroConfig, batch_norm: bool = False
    ):
        super().__init__(z_dim, channels, batch_norm)
        self.intro = intro

    def loss_per_image(self, out: VAEOutput, x: Tensor, cfg: TrainConfig) -> LossParts:
        return vae_loss_per_image(out, x, self.intro.beta_rec, self.intro.beta_kl, cfg.recon)

    def configure_optimizers(self, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        """[encoder, decoder]: the two players step separately."""
        return [
            adam(self.encoder.parameters(), cfg.lr),
            adam(self.decoder.parameters(), cfg.lr),
        ]

    def train_step(
        self, x: Tensor, y: Tensor, optimizers: list[torch.optim.Optimizer], cfg: TrainConfig,
        epoch: int,
    ) -> LossParts:  # fmt: skip
        opt_e, opt_d = optimizers
        if epoch < self.intro.warmup_epochs:  # the official code's ``num_vae`` epochs
            parts = self.loss(self(x, y), x, cfg)
            opt_e.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            parts.total.backward()
            opt_e.step()
            opt_d.step()
            return parts
        noise = torch.randn(len(x), self.z_dim, device=x.device, dtype=x.dtype)
        parts, z = self.encoder_step(x, noise, opt_e, cfg)
        parts.extra["dec_loss"] = self.decoder_step(x, z, noise, opt_d, cfg)
        return parts

    # -- the two halves of Algorithm 1
    def encoder_step(
        self, x: Tensor, noise: Tensor, optimizer: torch.optim.Optimizer, cfg: TrainConfig
    ) -> tuple[LossParts, Tensor]:
        """Minimise s * (-ELBO(x)) + 1/2 * 1/2 * sum_f exp(-2 s (beta_rec rec_f + beta_neg kl_f)).

        Returns the real-data terms (unscaled batch means, as :meth:`loss` reports them) with
        the two exponentials as extras, and the posterior sample z the decoder step reuses.
        """
        b = self.intro
        s = 1.0 / x[0].numel()  # official ``scale = 1 / (C*H*W)``: ELBOs per data dimension
        with self._only_trainable(self.encoder):
            mu, logvar = self.encode(x)
            z = reparameterize(mu, logvar)
            logits = self.decode(z)
            rec, kl = recon_per_image(logits, x, cfg.recon), kl_per_image(mu, logvar)
            real = b.beta_rec * rec + b.beta_kl * kl
            with torch.no_grad():
                fake = torch.sigmoid(self.decode(noise))
            # Fakes are fixed inputs here: the encoder alone must learn to score them low.
            exp_fake = self._exp_elbo(fake, s, cfg)
            exp_rec = self._exp_elbo(torch.sigmoid(logits).detach(), s, cfg)
            loss = s * real.mean() + 0.5 * 0.5 * (exp_fake.mean() + exp_rec.mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        extra = {"exp_fake": exp_fake.mean().detach(), "exp_rec": exp_rec.mean().detach()}
        return LossParts(real.mean().detach(), rec.mean().detach(), kl.mean().detach(), extra), z

    def decoder_step(
        self, x: Tensor, z: Tensor, noise: Tensor, optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
    ) -> Tensor:  # fmt: skip
        """Minimise s * (beta_rec rec(x) + 1/2 sum_f (beta_kl kl_f + gamma_r beta_rec rec_f)).

        The fakes' KL reaches the decoder through the (frozen) encoder's input; their
        reconstruction only through the decoder weights (targets and z_f detached), as in the
        official code. Returns that loss (scaled by s, as optimised).
        """
        b = self.intro
        s = 1.0 / x[0].numel()
        with self._only_trainable(self.decoder):
            logits = self.decode(z.detach())
            fakes = [torch.sigmoid(logits), torch.sigmoid(self.decode(noise))]  # rec, D(z)
            kl_f, rec_f = 0.0, 0.0
            for f in fakes:
                mu_f, logvar_f = self.encode(f)
                z_f = reparameterize(mu_f, logvar_f).detach()
                kl_f = kl_f + kl_per_image(mu_f, logvar_f).mean()
                rec_f = rec_f + recon_per_image(self.decode(z_f), f.detach(), cfg.recon).mean()
            rec = recon_per_image(logits, x, cfg.recon).mean()
            loss = s * (
                b.beta_rec * rec + 0.5 * (b.beta_kl * kl_f + b.gamma_r * b.beta_rec * rec_f)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    def _exp_elbo(self, f: Tensor, s: float, cfg: TrainConfig) -> Tensor:
        """exp(alpha * s * ELBO(f)) per image, alpha = 2, KL weighted by ``beta_neg``.

        The argument is -2 s (rec + KL) <= 0, so the value lies in (0, 1]: it cannot overflow
        and needs no clamp (the official code has none); large negative ELBOs underflow to 0,
        i.e. confidently rejected fakes stop contributing gradient.
        """
        mu, logvar = self.encode(f)
        logits = self.decode(reparameterize(mu, logvar))
        neg_elbo = self.intro.beta_rec * recon_per_image(logits, f, cfg.recon)
        neg_elbo = neg_elbo + self.intro.beta_neg * kl_per_image(mu, logvar)
        return torch.exp(-2.0 * s * neg_elbo)

    @contextmanager
    def _only_trainable(self, part: nn.Module) -> Iterator[None]:
        """Freeze the other half, as the official code does: its weights get no gradient
        (so its optimiser state is untouched) while gradients still flow through it."""
        self.requires_grad_(False)
        part.requires_grad_(True)
        try:
            yield
        finally:
            self.requires_grad_(True)
