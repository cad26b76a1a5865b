"""Sampler registry: ``generate.sampler`` -> where the decoder's latents come from.

- ``prior``: the model's own prior (N(0, I); the PixelCNN for ``vqvae``);
- ``gmm``: a Gaussian mixture on the posterior means of the training images;
- ``two-stage``: a second, small VAE on those means.
"""

from __future__ import annotations

from pathlib import Path

from bam_vae.config import GenerateConfig, GmmConfig, TwoStageConfig
from bam_vae.errors import BamError
from bam_vae.samplers.base import LatentSampler, Pca, read_file

__all__ = ["KINDS", "LatentSampler", "build_sampler", "check_supported", "load_sampler"]

KINDS = ("prior", "gmm", "two-stage")


def check_supported(kind: str, arch: str) -> None:
    if arch == "vqvae" and kind != "prior":
        raise BamError(
            f"generate.sampler: {kind!r} is not available for vqvae, whose latents are discrete"
            " codes with a learned PixelCNN prior; use generate.sampler=prior (that PixelCNN)"
        )


def _make(kind: str, z_dim: int, conditional: bool, max_dim: int, config: dict) -> LatentSampler:
    if kind == "gmm":
        from bam_vae.samplers.gmm import GmmSampler

        return GmmSampler(z_dim, conditional, max_dim, GmmConfig.model_validate(config))
    if kind == "two-stage":
        from bam_vae.samplers.two_stage import TwoStageSampler

        return TwoStageSampler(z_dim, conditional, max_dim, TwoStageConfig.model_validate(config))
    from bam_vae.samplers.prior import PriorSampler

    return PriorSampler(z_dim, conditional, max_dim)


def build_sampler(cfg: GenerateConfig, arch: str, z_dim: int, conditional: bool) -> LatentSampler:
    """An unfitted sampler of kind ``cfg.sampler`` for a model of ``arch``."""
    check_supported(cfg.sampler, arch)
    config = {"gmm": cfg.gmm, "two-stage": cfg.two_stage}.get(cfg.sampler)
    dumped = config.model_dump() if config else {}
    return _make(cfg.sampler, z_dim, conditional, cfg.max_dim, dumped)


def load_sampler(path: Path, kind: str, model_sha256: str) -> LatentSampler:
    """The fitted sampler in ``path``, checked to be of ``kind`` and fitted to that model."""
    meta, arrays = read_file(path)
    if meta["kind"] != kind:
        raise BamError(
            f"sampler file {path} holds a {meta['kind']!r} sampler, generate.sampler asks for"
            f" {kind!r}; run `bam fit-sampler` (or `dvc repro`)"
        )
    if meta["model_sha256"] != model_sha256:
        raise BamError(
            f"sampler file {path} was fitted to another model (sha256"
            f" {meta['model_sha256'][:12]}, expected {model_sha256[:12]}); run `bam fit-sampler`"
        )
    sampler = _make(kind, meta["z_dim"], meta["conditional"], meta["max_dim"], meta["config"])
    sampler.load_arrays(arrays)
    sampler.pca = Pca.from_arrays(arrays)
    return sampler
