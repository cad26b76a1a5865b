"""Stage ``generate-1024``: decode ``generate.n`` latents drawn from N(0, I), and reconstruct.

Writes ``data/generated/images.npy`` (float32, N x 28 x 28, values in [0, 1]; for a
conditional model also ``labels.npy``, the digits asked for), the sample grid
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
from bam_vae.errors import BamError
from bam_vae.figures import image_grid, image_rows
from bam_vae.models import VAE, load_model
from bam_vae.paths import atomic_path

OUT_DIR = Path("data/generated")
FIG_DIR = Path("figures")


def sample_labels(n: int, seed: int, digit: int | None) -> torch.Tensor:
    """Balanced digits (n // 10 or n // 10 + 1 each), shuffled with ``seed``; or all ``digit``."""
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]


@torch.no_grad()
def sample(vae: VAE, n: int, seed: int, labels: torch.Tensor | None, batch: int = 512):
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i : i + batch]
        parts.append(vae.sample(min(batch, n - i), gen, y))
    return torch.cat(parts)


def reconstruction_set(data_dir: str, per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` test images of each digit, digits in order 0..9."""
    images, labels = load_split(data_dir, "test")
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return images[idx].float().div(255.0).unsqueeze(1), labels[idx]


def resolve_model(model_uri: str | None) -> tuple[VAE, str]:
    """(VAE, MLflow run id): the pipeline's model, or the one behind any MLflow model URI.

    A URI (``models:/bam-vae-cnn/3``, ``models:/bam-vae-cnn@champion``, ``runs:/...``) is
    resolved to the run that logged it, whose ``checkpoint/vae.pt`` holds the same weights as
    the registered generator plus the encoder (needed for reconstructions).
    """
    if not model_uri:
        return load_model("models/vae.pt")[0], tracking.read_run_ref()["run_id"]
    tracking.init()
    run_id = tracking.model_run_id(model_uri)
    return load_model(tracking.download_checkpoint(run_id))[0], run_id


def generate(
    params: Params,
    model_uri: str | None = None,
    digit: int | None = None,
    out_dir: Path = OUT_DIR,
    fig_dir: Path = FIG_DIR,
) -> dict:
    cfg = params.generate
    vae, run_id = resolve_model(model_uri)
    if digit is not None and not vae.conditional:
        raise BamError(f"--digit {digit}: model {type(vae).__name__} is not conditional (use cvae)")
    labels = sample_labels(cfg.n, cfg.seed, digit) if vae.conditional else None
    images = sample(vae, cfg.n, cfg.seed, labels)

    with atomic_path(out_dir / "images.npy") as tmp, tmp.open("wb") as fh:
        np.save(fh, images[:, 0].numpy().astype(np.float32))
    (out_dir / "labels.npy").unlink(missing_ok=True)
    if labels is not None:  # the digits asked for, for label accuracy in compute-fid
        with atomic_path(out_dir / "labels.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, labels.numpy())
    grid, recon = fig_dir / "samples.png", fig_dir / "reconstructions.png"
    image_grid(images, grid, nrow=math.ceil(math.sqrt(cfg.n)))
    x, y = reconstruction_set(params.data.out_dir, cfg.per_digit)
    with torch.no_grad():
        rebuilt = vae.reconstruct(x, y if vae.conditional else None)
    title = f"first {cfg.per_digit} test images of each digit (top) and reconstructions (bottom)"
    image_rows([x, rebuilt], ["test", "recon"], title, recon)

    with tracking.reopen_run(run_id):
        mlflow.log_artifact(str(grid), "figures")
        mlflow.log_artifact(str(recon), "figures")
    print(f"generate: {cfg.n} images -> {out_dir / 'images.npy'}, figures in {fig_dir}")
    return {"n": cfg.n, "run_id": run_id}
