"""Model registry: ``model.arch`` -> a VAE built from its config."""

from __future__ import annotations

import torch

from bam_vae.config import ModelConfig
from bam_vae.errors import BamError
from bam_vae.models.base import VAE, LossParts, VAEOutput, adam, on_device, vae_loss
from bam_vae.models.cnn import CNNVAE
from bam_vae.models.dense import DenseVAE

__all__ = [
    "VAE",
    "LossParts",
    "VAEOutput",
    "adam",
    "on_device",
    "vae_loss",
    "build_model",
    "n_parameters",
]


def build_model(cfg: ModelConfig, n_classes: int = 10) -> VAE:
    """The VAE for ``model.arch``; variants live in their own modules, imported on use.
    ``n_classes``: the dataset's class count (only a conditional model uses it)."""
    if cfg.arch == "dense":
        return DenseVAE(cfg.z_dim, cfg.hidden)
    if cfg.arch == "cnn":
        return CNNVAE(cfg.z_dim, cfg.channels, cfg.batch_norm)
    if cfg.arch == "cvae":
        from bam_vae.models.cvae import CVAE

        return CVAE(cfg.z_dim, cfg.channels, n_classes, cfg.batch_norm)
    if cfg.arch == "rae":
        from bam_vae.models.rae import RAE

        return RAE(cfg.z_dim, cfg.channels, cfg.rae, cfg.batch_norm)
    if cfg.arch == "vqvae":
        from bam_vae.models.vqvae import VQVAE

        return VQVAE(cfg.channels, cfg.vq)
    if cfg.arch == "introvae":
        from bam_vae.models.introvae import SoftIntroVAE

        return SoftIntroVAE(cfg.z_dim, cfg.channels, cfg.intro, cfg.batch_norm)
    raise BamError(
        f"model.arch: unknown model {cfg.arch!r}; expected dense, cnn, cvae, vqvae, introvae or rae"
    )


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
