"""Stage ``fit-sampler``: fit ``generate.sampler`` to the posterior means of the training set.

Writes ``models/sampler.npz`` (see ``samplers/base.py``) and ``metrics/sampler.json`` (kind,
fit time, log-likelihood...), and logs the file into the model's MLflow run as
``sampler/<kind>.npz``, so a registered version carries every sampler fitted to it. The
stage depends only on the model, the data and the sampler params: a sampler sweep never
retrains a VAE.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from bam_vae import tracking
from bam_vae.config import Params
from bam_vae.data import load_split
from bam_vae.models import VAE, load_model
from bam_vae.paths import file_sha256, staged_outputs, write_json
from bam_vae.samplers import build_sampler
from bam_vae.train import MODEL_PATH, resolve_device

SAMPLER_PATH = Path("models/sampler.npz")
METRICS_PATH = Path("metrics/sampler.json")


@torch.no_grad()
def posterior_means(vae: VAE, data_dir: str, batch: int = 1000):
    """Latent means of the 60 000 training images (on the CPU), and their digits.

    Encoded on ``vae``'s device, the images moved there once (47 MB as bytes)."""
    images, labels = load_split(data_dir, "train")
    x, y = images.to(vae.device), labels.to(vae.device)
    means = [
        vae.latent(x[i : i + batch].float().div(255.0).unsqueeze(1), y[i : i + batch])
        for i in range(0, len(x), batch)
    ]
    return torch.cat(means).cpu(), labels


def fit_sampler(
    params: Params,
    model_path: Path = MODEL_PATH,
    out: Path = SAMPLER_PATH,
    metrics_path: Path = METRICS_PATH,
) -> dict:
    cfg = params.generate
    vae, model_cfg = load_model(model_path)
    vae.to(resolve_device(cfg.device, "generate.device"))
    sampler = build_sampler(cfg, model_cfg.arch, vae.z_dim, vae.conditional)
    run_id = tracking.read_run_ref()["run_id"]
    tracking.init()  # an unreachable tracking server fails here, before any work
    start = time.perf_counter()
    metrics: dict = {"sampler": cfg.sampler, "z_dim": vae.z_dim}
    if cfg.sampler != "prior":
        latents, labels = posterior_means(vae, params.data.out_dir)
        metrics |= {"n_latents": len(latents)} | sampler.fit(latents, labels)
    metrics["fit_seconds"] = round(time.perf_counter() - start, 3)

    # Logged first, moved into place last: a failure leaves the earlier files as they were.
    with tempfile.TemporaryDirectory() as tmp, staged_outputs() as staged:
        logged = Path(tmp) / f"{cfg.sampler}.npz"  # the artifact's name in the run
        sampler.save(logged, file_sha256(model_path))
        scalars = {f"{cfg.sampler}/{k}": v for k, v in metrics.items() if k != "sampler"}
        with tracking.reopen_run(run_id):
            mlflow.log_artifact(str(logged), "sampler")
            mlflow.log_metrics(scalars)
            mlflow.set_tag(f"{cfg.sampler}/config", json.dumps(sampler.config()))
        staged.path(out).write_bytes(logged.read_bytes())
        write_json(staged.path(metrics_path), metrics)
    print(f"fit-sampler: {cfg.sampler} fitted in {metrics['fit_seconds']:.1f} s -> {out}")
    return metrics
