"""Stage ``generate-1024``: decode ``generate.n`` latents drawn from N(0, I), and reconstruct.

Writes ``data/generated/images.npy`` (float32, N x 28 x 28, values in [0, 1]), the sample grid
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
from bam_vae.config import Params
from bam_vae.data import load_split
from bam_vae.figures import image_grid, image_rows
from bam_vae.models import VAE, Generator, load_model
from bam_vae.paths import atomic_path

OUT_DIR = Path("data/generated")
FIG_DIR = Path("figures")


def latents(n: int, z_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(generator: torch.nn.Module, z: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([generator(z[i : i + batch]) for i in range(0, len(z), batch)])


def reconstruction_set(data_dir: str, per_digit: int) -> torch.Tensor:
    """The first ``per_digit`` test images of each digit, digits in order 0..9."""
    images, labels = load_split(data_dir, "test")
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return images[idx].float().div(255.0).unsqueeze(1)


@torch.no_grad()
def reconstruct(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    mu, _ = vae.encode(x)
    return torch.sigmoid(vae.decode(mu))


def model_from_uri(model_uri: str) -> tuple[torch.nn.Module, VAE, str]:
    """(registered generator, full VAE from the same run, run id) for any MLflow model URI."""
    tracking.init()
    run_id = tracking.model_run_id(model_uri)
    generator = mlflow.pytorch.load_model(model_uri)
    vae, _ = load_model(tracking.download_checkpoint(run_id))
    return generator, vae, run_id


def generate(
    params: Params,
    model_uri: str | None = None,
    out_dir: Path = OUT_DIR,
    fig_dir: Path = FIG_DIR,
) -> dict:
    cfg = params.generate
    if model_uri:
        generator, vae, run_id = model_from_uri(model_uri)
    else:
        vae, _ = load_model("models/vae.pt")
        generator, run_id = Generator(vae).eval(), tracking.read_run_ref()["run_id"]

    images = sample(generator, latents(cfg.n, vae.z_dim, cfg.seed))
    with atomic_path(out_dir / "images.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, images[:, 0].numpy().astype(np.float32))
    grid, recon = fig_dir / "samples.png", fig_dir / "reconstructions.png"
    image_grid(images, grid, nrow=math.ceil(math.sqrt(cfg.n)))
    x = reconstruction_set(params.data.out_dir, cfg.per_digit)
    title = f"first {cfg.per_digit} test images of each digit (top) and reconstructions (bottom)"
    image_rows([x, reconstruct(vae, x)], ["test", "recon"], title, recon)

    with tracking.reopen_run(run_id):
        mlflow.log_artifact(str(grid), "figures")
        mlflow.log_artifact(str(recon), "figures")
    print(f"generate: {cfg.n} images -> {out_dir / 'images.npy'}, figures in {fig_dir}")
    return {"n": cfg.n, "run_id": run_id}
