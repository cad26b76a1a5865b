"""Regularised deterministic autoencoder, RAE (Ghosh et al., ICLR 2020, "From Variational
to Deterministic Autoencoders"): the conv net of ``cnn`` with a deterministic code, sampled
afterwards by a mixture fitted to the training codes (the ``gmm`` sampler, the default).

Loss per image: ``k1 * reconstruction + k2 * ||z||^2 / 2`` (``train.k1``, ``train.k2``;
the reconstruction term is ``train.recon``'s, summed over pixels) plus, on the decoder's
weights (not biases), ``model.rae.decoder_l2 * sum(theta^2)`` (RAE-L2), applied by Adam's
L2 ``weight_decay`` (its gradient). RAE's MNIST code scales a per-pixel *mean* squared error:
its RAE-L2 (beta = 1e-4 on mean(z^2) over z = 16, decay 1e-7) is ``train.k2=0.0049`` and
``decoder_l2: 3.9e-5`` at ``train.k1=0.5`` with ``train.recon=mse`` (both times 784 * k1).

How it fills :class:`VAEOutput`: ``mu`` = ``z`` = the code (no noise), ``logvar`` zeros
(there is no posterior variance, as for the VQ-VAE); ``kl`` is zeros and the code penalty is
logged as ``latent_l2``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bam_vae.models.base import LossParts, VAEOutput, adam, recon_per_image
from bam_vae.models.cnn import CNNVAE

if TYPE_CHECKING:
    from bam_vae.config import RAEConfig, TrainConfig


class RAE(CNNVAE):
    def __init__(self, z_dim: int, channels: list[int], cfg: RAEConfig, batch_norm: bool = False):
        super().__init__(z_dim, channels, batch_norm, out=1)  # the code only, no variance
        self.cfg = cfg

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, torch.zeros_like(z)

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> VAEOutput:
        z, zeros = self.encode(x, y)
        return VAEOutput(logits=self.decode(z, y), mu=z, logvar=zeros, z=z)

    def loss_per_image(self, out: VAEOutput, x: Tensor, cfg: TrainConfig) -> LossParts:
        rec = recon_per_image(out.logits, x, cfg.recon)
        code = 0.5 * out.z.pow(2).sum(dim=1)
        return LossParts(cfg.k1 * rec + cfg.k2 * code, rec, torch.zeros_like(rec),
                         {"latent_l2": code})  # fmt: skip

    def configure_optimizers(self, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        """Adam; the decoder's weight matrices and kernels decay (2 x decoder_l2 is the
        gradient of decoder_l2 * theta^2)."""
        weights = [p for p in self.decoder.parameters() if p.ndim > 1]
        chosen = {id(p) for p in weights}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        groups = [{"params": weights, "weight_decay": 2 * self.cfg.decoder_l2},
                  {"params": rest, "weight_decay": 0.0}]  # fmt: skip
        return [adam(groups, cfg.lr)]
