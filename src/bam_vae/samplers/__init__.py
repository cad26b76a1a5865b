"""Sampler registry: ``generate.sampler`` -> where the decoder's latents come from.

- ``prior``: the prior the model was trained under (N(0, I); uniform codes for ``vqvae``);
- ``gmm``: a Gaussian mixture on the posterior means of the training images;
- ``two-stage``: a second, small VAE on those means;
- ``flow``: a neural spline flow on those means (zuko);
- ``pixelcnn``: an autoregressive prior over the VQ-VAE's code grids;
- ``auto``: the model's own default (:func:`resolve_kind`).

A new sampler is one module here (a :class:`LatentSampler` subclass) and one entry in
``REGISTRY``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bam_vae.config import GenerateConfig
from bam_vae.errors import BamError
from bam_vae.samplers.base import LatentSampler, Pca, read_file

if TYPE_CHECKING:
    from bam_vae.models import VAE

__all__ = [
    "KINDS",
    "LatentSampler",
    "build_sampler",
    "check_supported",
    "load_sampler",
    "sampler_for",
]

# kind -> (module, class, the GenerateConfig field with its params or None)
REGISTRY = {
    "prior": ("bam_vae.samplers.prior", "PriorSampler", None),
    "gmm": ("bam_vae.samplers.gmm", "GmmSampler", "gmm"),
    "two-stage": ("bam_vae.samplers.two_stage", "TwoStageSampler", "two_stage"),
    "flow": ("bam_vae.samplers.flow", "FlowSampler", "flow"),
    "pixelcnn": ("bam_vae.samplers.pixelcnn", "PixelCnnSampler", "pixelcnn"),
}
KINDS = tuple(REGISTRY)
# What ``auto`` means for a model, by the kind of latents it has.
DEFAULTS = {"continuous": "gmm", "codes": "pixelcnn"}


def sampler_class(kind: str) -> type[LatentSampler]:
    module, name, _ = REGISTRY[kind]
    return getattr(importlib.import_module(module), name)


def resolve_kind(kind: str, latent_kind: str) -> str:
    """``generate.sampler`` with ``auto`` replaced by the default for ``latent_kind``."""
    return DEFAULTS[latent_kind] if kind == "auto" else kind


def check_supported(kind: str, latent_kind: str) -> None:
    """One line if sampler ``kind`` cannot be fitted to latents of ``latent_kind``."""
    fits = sampler_class(kind).fits
    if latent_kind not in fits:
        usable = [k for k in KINDS if latent_kind in sampler_class(k).fits]
        raise BamError(
            f"generate.sampler: {kind!r} fits {' or '.join(fits)} latents, and this model's"
            f" latents are {latent_kind}; expected auto or one of {', '.join(usable)}"
        )


def _make(
    kind: str, z_dim: int, conditional: bool, max_dim: int, config: dict, n_classes: int
) -> LatentSampler:
    cls = sampler_class(kind)
    if cls.config_type is None:
        sampler = cls(z_dim, conditional, max_dim)
    else:
        sampler = cls(z_dim, conditional, max_dim, cls.config_type.model_validate(config))
    sampler.n_classes = n_classes
    return sampler


def build_sampler(
    cfg: GenerateConfig, z_dim: int, conditional: bool, latent_kind: str = "continuous",
    n_classes: int = 10,
) -> LatentSampler:  # fmt: skip
    """An unfitted sampler of kind ``cfg.sampler`` (``auto`` resolved) for a model whose
    latents are ``latent_kind`` (``VAE.latent_kind``) of ``z_dim`` dims; a conditional one
    draws for ``n_classes`` classes."""
    kind = resolve_kind(cfg.sampler, latent_kind)
    check_supported(kind, latent_kind)
    field = REGISTRY[kind][2]
    dumped = getattr(cfg, field).model_dump() if field else {}
    return _make(kind, z_dim, conditional, cfg.max_dim, dumped, n_classes)


def sampler_for(cfg: GenerateConfig, vae: VAE) -> LatentSampler:
    """:func:`build_sampler` for a loaded model."""
    return build_sampler(cfg, vae.z_dim, vae.conditional, vae.latent_kind, vae.n_classes)


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
    # Files written before other datasets existed are MNIST's: 10 classes.
    n_classes = meta.get("n_classes", 10)
    sampler = _make(kind, meta["z_dim"], meta["conditional"], meta["max_dim"], meta["config"],
                    n_classes)  # fmt: skip
    sampler.load_arrays(arrays)
    sampler.pca = Pca.from_arrays(arrays)
    return sampler


def sample_labels(n: int, seed: int, label: int | None, n_classes: int = 10) -> torch.Tensor:
    """Balanced classes (n // n_classes or one more each), shuffled with ``seed``; or all
    ``label``. int64, shape n."""
    if label is not None:
        return torch.full((n,), label, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.arange(n) % n_classes)[torch.randperm(n, generator=gen)]


@torch.no_grad()
def sample(
    vae: VAE, sampler: LatentSampler, n: int, seed: int, labels: torch.Tensor | None,
    batch: int = 512,
) -> torch.Tensor:  # fmt: skip
    """``n`` images (float32, n x 1 x 28 x 28, in [0, 1], on the CPU) from ``vae``'s decoder
    at latents drawn by ``sampler`` with a CPU generator seeded by ``seed``, in batches."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i : i + batch]
        parts.append(sampler.draw(vae, min(batch, n - i), gen, y).cpu())
    return torch.cat(parts)


def fitted_sampler(
    cfg: GenerateConfig, vae: VAE, model_path: Path, run_id: str | None = None
) -> LatentSampler:
    """The fitted ``cfg.sampler`` (``auto`` resolved) of the model in ``model_path``, loaded
    as ``vae``: ``models/sampler.npz``, or with ``run_id`` the copy logged in that MLflow
    run (``sampler/<kind>.npz``). ``prior`` needs no file."""
    from bam_vae import paths
    from bam_vae.files import file_sha256

    sampler = sampler_for(cfg, vae)
    if sampler.kind == "prior":
        return sampler
    if run_id:
        from bam_vae.tracking.store import download_artifact

        path = download_artifact(run_id, f"sampler/{sampler.kind}.npz")
    else:
        path = paths.SAMPLER
    return load_sampler(path, sampler.kind, file_sha256(model_path))
