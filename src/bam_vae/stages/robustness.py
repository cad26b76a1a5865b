"""Stage ``robustness``: what the VAE does with pure noise (section 3.1, Figure 7), measured.

Gaussian noise (``gaussian_mean``, ``gaussian_std``, clipped to [0, 1]) and uniform noise
images are encoded and reconstructed. The report observed that noise comes back as a
plausible digit; here that is counted (share of noise reconstructions the evaluator assigns a
class with confidence >= ``confidence``), the posterior means are compared (mean ||mu|| of
noise vs test images), and we ask whether the per-image negative ELBO (the training loss,
k1 * recon + k2 * KL) separates test images from noise (AUROC; 1.0 = perfectly flagged).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split
from bam_vae.figures import image_rows
from bam_vae.files import staged_outputs, write_json
from bam_vae.models import VAE
from bam_vae.models.saved import load_model
from bam_vae.scoring.evaluator import NoClassifier, load_evaluator, predict
from bam_vae.scoring.ood import auroc
from bam_vae.tracking import store as tracking


def noise_images(kind: str, n: int, params: Params) -> torch.Tensor:
    cfg = params.robustness
    gen = torch.Generator().manual_seed(cfg.seed + (kind == "uniform"))
    if kind == "uniform":
        return torch.rand(n, 1, 28, 28, generator=gen)
    noise = torch.randn(n, 1, 28, 28, generator=gen) * cfg.gaussian_std + cfg.gaussian_mean
    return noise.clamp(0.0, 1.0)


@torch.no_grad()
def respond(vae: VAE, x: torch.Tensor, y: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
    """Latent-mean norm, negative ELBO (the model's own per-image loss), reconstruction."""
    gen = torch.Generator().manual_seed(params.robustness.seed)
    out = vae(x, y, generator=gen)
    neg_elbo = vae.loss_per_image(out, x, params.train).total
    return {"mu_norm": out.mu.norm(dim=1), "neg_elbo": neg_elbo, "recon": vae.reconstruct(x, y)}


def robustness(
    params: Params,
    figure: Path = paths.ROBUSTNESS_FIGURE,
    metrics_path: Path = paths.ROBUSTNESS_METRICS,
) -> dict:
    cfg = params.robustness
    run_id = tracking.model_run("robustness")["run_id"]
    vae, _ = load_model(paths.MODEL)
    try:
        evaluator = load_evaluator(paths.EVALUATOR)
    except NoClassifier as why:  # data without labels: no judge of the reconstructions
        print(f"robustness: {why}")
        evaluator = None
    images, labels = load_split(params.data.out_dir, "test")
    test = respond(vae, images[: cfg.n].float().div(255.0).unsqueeze(1), labels[: cfg.n], params)
    # A conditional model needs a label even for noise: any class, drawn at random.
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_labels = torch.randint(0, max(vae.n_classes, 1), (cfg.n,), generator=gen)
    metrics: dict[str, float] = {"mu_norm_test": test["mu_norm"].mean().item()}
    rows, names = [], []
    for kind in ("gaussian", "uniform"):
        x = noise_images(kind, cfg.n, params)
        res = respond(vae, x, noise_labels, params)
        scores = torch.cat([test["neg_elbo"], res["neg_elbo"]]).numpy()
        is_noise = np.r_[np.zeros(len(test["neg_elbo"])), np.ones(len(x))]
        if evaluator is not None:
            probs = predict(evaluator, res["recon"])[1]
            share = float((probs.max(axis=1) >= cfg.confidence).mean())
            metrics[f"{kind}_confident_class_share"] = share
        metrics |= {
            f"mu_norm_{kind}": res["mu_norm"].mean().item(),
            f"auroc_neg_elbo_{kind}": auroc(is_noise, scores),
        }
        rows += [x[:10], res["recon"][:10]]
        names += [f"{kind} noise", "recon"]
    title = "Pure noise (rows 1, 3) and the VAE's reconstructions of it (rows 2, 4)"
    with staged_outputs() as out:
        image_rows(rows, names, title, out.path(figure))
        write_json(out.path(metrics_path), metrics)
        with tracking.reopen_run(run_id):
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out.path(figure)), "figures")
    print("robustness: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics
