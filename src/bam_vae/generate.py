"""Stage ``generate-1024``: decode ``generate.n`` latents drawn by ``generate.sampler``, and
reconstruct.

Writes ``data/generated/images.npy`` (float32, N x 28 x 28, values in [0, 1]; for a
conditional model also ``labels.npy``, the digits asked for; ``meta.json`` names the sampler),
the sample grid
``figures/samples.png`` (32 x 32 for 1024) and ``figures/reconstructions.png``: the first
``generate.per_digit`` test images of each digit 0-9 (in test-set order) above their
reconstructions from the posterior mean. Both PNGs are logged into the model's MLflow run.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import torch

from bam_vae import tracking
from bam_vae.config import GenerateConfig, Params
from bam_vae.data import load_split
from bam_vae.errors import BamError
from bam_vae.figures import image_grid, image_panels, image_rows
from bam_vae.fit_sampler import SAMPLER_PATH, posterior_means
from bam_vae.models import VAE, load_model
from bam_vae.models.base import on_device
from bam_vae.paths import file_sha256, staged_outputs, write_json
from bam_vae.samplers import (
    KINDS,
    LatentSampler,
    build_sampler,
    check_supported,
    load_sampler,
)
from bam_vae.train import MODEL_PATH, resolve_device

OUT_DIR = Path("data/generated")
FIG_DIR = Path("figures")


def sample_labels(n: int, seed: int, digit: int | None) -> torch.Tensor:
    """Balanced digits (n // 10 or n // 10 + 1 each), shuffled with ``seed``; or all ``digit``."""
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]


@torch.no_grad()
def sample(
    vae: VAE, sampler: LatentSampler, n: int, seed: int, labels: torch.Tensor | None,
    batch: int = 512,
) -> torch.Tensor:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i : i + batch]
        parts.append(sampler.draw(vae, min(batch, n - i), gen, y).cpu())
    return torch.cat(parts)


def reconstruction_set(data_dir: str, per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` test images of each digit, digits in order 0..9."""
    images, labels = load_split(data_dir, "test")
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return images[idx].float().div(255.0).unsqueeze(1), labels[idx]


def resolve_model(model_uri: str | None) -> tuple[Path, str]:
    """(model file, MLflow run id): the pipeline's model, or the one behind any model URI.

    A URI (``models:/bam-vae-cnn/3``, ``models:/bam-vae-cnn@champion``, ``runs:/...``) is
    resolved to the run that logged it, whose ``checkpoint/vae.pt`` holds the same weights as
    the registered generator plus the encoder (needed for reconstructions).
    """
    if not model_uri:
        return MODEL_PATH, tracking.read_run_ref()["run_id"]
    tracking.init()
    run_id = tracking.model_run_id(model_uri)
    return tracking.download_artifact(run_id, "checkpoint/vae.pt"), run_id


def resolve_sampler(
    cfg: GenerateConfig, vae: VAE, arch: str, model_path: Path, run_id: str, from_run: bool
) -> LatentSampler:
    """The fitted ``cfg.sampler`` of the model in ``model_path`` (loaded as ``vae``):
    ``models/sampler.npz``, or the run's copy."""
    if cfg.sampler == "prior":
        return build_sampler(cfg, arch, vae.z_dim, vae.conditional)
    check_supported(cfg.sampler, arch)
    path = (
        tracking.download_artifact(run_id, f"sampler/{cfg.sampler}.npz")
        if from_run
        else SAMPLER_PATH
    )
    return load_sampler(path, cfg.sampler, file_sha256(model_path))


def generate(
    params: Params,
    model_uri: str | None = None,
    digit: int | None = None,
    out_dir: Path = OUT_DIR,
    fig_dir: Path = FIG_DIR,
) -> dict:
    cfg = params.generate
    device = resolve_device(cfg.device, "generate.device")
    tracking.init()  # an unreachable tracking server fails here, before any work
    model_path, run_id = resolve_model(model_uri)
    vae, model_cfg = load_model(model_path)
    vae.to(device)
    sampler = resolve_sampler(cfg, vae, model_cfg.arch, model_path, run_id, bool(model_uri))
    if digit is not None and not vae.conditional:
        raise BamError(f"--digit {digit}: model {type(vae).__name__} is not conditional (use cvae)")
    labels = sample_labels(cfg.n, cfg.seed, digit) if vae.conditional else None
    images = sample(vae, sampler, cfg.n, cfg.seed, labels)
    x, y = reconstruction_set(params.data.out_dir, cfg.per_digit)
    with torch.no_grad():
        rebuilt = vae.reconstruct(*on_device(device, x, y if vae.conditional else None)).cpu()

    # Written aside, logged, then moved into place together: a failure changes nothing.
    with staged_outputs() as out:
        np.save(out.path(out_dir / "images.npy"), images[:, 0].numpy().astype(np.float32))
        if labels is None:
            out.remove(out_dir / "labels.npy")
        else:  # the digits asked for, for label accuracy in compute-fid
            np.save(out.path(out_dir / "labels.npy"), labels.numpy())
        meta = {"sampler": cfg.sampler, "n": cfg.n, "seed": cfg.seed,
                "model_uri": model_uri or str(MODEL_PATH)}  # fmt: skip
        write_json(out.path(out_dir / "meta.json"), meta)
        grid, recon = out.path(fig_dir / "samples.png"), out.path(fig_dir / "reconstructions.png")
        image_grid(images, grid, nrow=math.ceil(math.sqrt(cfg.n)))
        title = f"first {cfg.per_digit} test images of each digit (top) and reconstructions"
        image_rows([x, rebuilt], ["test", "recon"], title + " (bottom)", recon)
        with tracking.reopen_run(run_id):
            mlflow.log_artifact(str(grid), f"figures/{cfg.sampler}")
            mlflow.log_artifact(str(recon), "figures")
    print(f"generate: {cfg.n} images ({cfg.sampler} sampler) -> {out_dir / 'images.npy'},"
          f" figures in {fig_dir}")  # fmt: skip
    return {"n": cfg.n, "run_id": run_id, "sampler": cfg.sampler}


def compare_samplers(
    params: Params, model_uri: str | None = None, out: Path = FIG_DIR / "samplers.png", n: int = 100
) -> Path:
    """One model, every sampler: ``n`` samples of each, side by side (same seed).

    Samplers logged in the model's run are used as they are; a missing one is fitted here,
    with the current params, and not saved."""
    model_path, run_id = resolve_model(model_uri)
    vae, model_cfg = load_model(model_path)
    vae.to(resolve_device(params.generate.device, "generate.device"))
    kinds = ["prior"] if model_cfg.arch == "vqvae" else list(KINDS)
    labels = sample_labels(n, params.generate.seed, None) if vae.conditional else None
    panels, latents = [], None
    for kind in kinds:
        cfg = params.generate.model_copy(update={"sampler": kind})
        try:
            sampler = resolve_sampler(cfg, vae, model_cfg.arch, model_path, run_id, True)
        except BamError:
            if latents is None:
                latents = posterior_means(vae, params.data.out_dir)
            sampler = build_sampler(cfg, model_cfg.arch, vae.z_dim, vae.conditional)
            sampler.fit(*latents)
        panels.append((kind, sample(vae, sampler, n, params.generate.seed, labels)))
    image_panels(panels, f"{model_uri or model_path}: {n} samples per sampler", out)
    print(f"compare-samplers: {', '.join(kinds)} -> {out}")
    return out
