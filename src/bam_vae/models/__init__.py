"""Model registry: ``model.arch`` -> a VAE built from its config."""

from __future__ import annotations

from pathlib import Path

import torch

from bam_vae.config import ModelConfig
from bam_vae.errors import BamError
from bam_vae.models.base import VAE, Generator, LossParts, VAEOutput, adam, on_device, vae_loss
from bam_vae.models.cnn import CNNVAE
from bam_vae.models.dense import DenseVAE
from bam_vae.paths import load_saved_model, save_torch

__all__ = [
    "VAE",
    "Generator",
    "LossParts",
    "VAEOutput",
    "adam",
    "on_device",
    "vae_loss",
    "build_model",
    "load_model",
]


def build_model(cfg: ModelConfig) -> VAE:
    """The VAE for ``model.arch``; variants live in their own modules, imported on use."""
    if cfg.arch == "dense":
        return DenseVAE(cfg.z_dim, cfg.hidden)
    if cfg.arch == "cnn":
        return CNNVAE(cfg.z_dim, cfg.channels)
    if cfg.arch == "cvae":
        from bam_vae.models.cvae import CVAE

        return CVAE(cfg.z_dim, cfg.channels)
    if cfg.arch == "vqvae":
        from bam_vae.models.vqvae import VQVAE

        return VQVAE(cfg.channels, cfg.vq)
    if cfg.arch == "introvae":
        from bam_vae.models.introvae import SoftIntroVAE

        return SoftIntroVAE(cfg.z_dim, cfg.channels, cfg.intro)
    raise BamError(
        f"model.arch: unknown model {cfg.arch!r}; expected dense, cnn, cvae, vqvae or introvae"
    )


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: VAE, cfg: ModelConfig, path: Path) -> None:
    save_torch({"config": cfg.model_dump(), "state_dict": model.state_dict()}, path)


def load_model(path: str | Path) -> tuple[VAE, ModelConfig]:
    """Load ``models/vae.pt`` (plain tensors + config: safe with ``weights_only=True``)."""
    build = lambda config: build_model(ModelConfig.model_validate(config))  # noqa: E731
    model, config = load_saved_model(path, "model", "run `bam train` (or `dvc repro`)", build)
    return model, ModelConfig.model_validate(config)
