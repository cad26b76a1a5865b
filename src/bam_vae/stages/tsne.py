"""Stage ``tsne``: the latent space of unseen test images, coloured by class (section 2.5).

``tsne.n`` test images are encoded to their posterior means. z_dim = 1 is drawn as one strip
per class, z_dim = 2 directly, z_dim >= 3 through scikit-learn's t-SNE (after PCA to 50
dimensions when z_dim > 50, the usual speed-up). Writes ``figures/tsne.png`` and the 2-D
coordinates ``metrics/tsne.csv`` (a ``dvc plots`` scatter).
"""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import DatasetInfo, load_info, load_split
from bam_vae.figures import colormap, save_figure, subplots
from bam_vae.files import staged_outputs
from bam_vae.models.saved import load_model
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import configure_threads


def embed(z: np.ndarray, perplexity: float, seed: int, threads: int = 1) -> tuple[np.ndarray, str]:
    """2-D coordinates for plotting, and how they were obtained.

    ``threads`` caps scikit-learn's OpenMP pool: spinning OpenMP threads on a busy 2-core
    machine made a 60-point t-SNE take 85 s instead of 0.15 s.
    """
    if z.shape[1] == 1:
        return np.column_stack([z[:, 0], np.zeros(len(z))]), "z (1-D)"
    if z.shape[1] == 2:
        return z, "z (2-D, no projection)"
    method = "t-SNE"
    if z.shape[1] > 50:
        z = PCA(n_components=50, random_state=seed).fit_transform(z)
        method = "PCA(50) + t-SNE"
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, len(z) - 1), init="pca", random_state=seed
    )
    return tsne.fit_transform(z), method


def plot(
    xy: np.ndarray, labels: np.ndarray, info: DatasetInfo, z_dim: int, method: str, path: Path
) -> None:
    """Scatter coloured by class, legend of class names (``tab10`` up to 10 classes,
    ``tab20`` up to 20, then a continuous map and every class name in a 3-column legend)."""
    names = list(info.classes) if info.labelled else ["all images"]
    k = len(names)
    colours = colormap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    colour = (lambda c: colours(c)) if k <= 20 else (lambda c: colours(c / max(k - 1, 1)))
    what = "digit" if info.name == "mnist" else "class"
    fig, ax = subplots(figsize=(7 if k <= 20 else 10, 6) if z_dim > 1 else (8, 4))
    for c, name in enumerate(names):
        pts = xy[labels == c]
        if z_dim == 1:  # one horizontal strip per class, jittered so points do not overlap
            jitter = np.random.default_rng(c).uniform(-0.3, 0.3, len(pts))
            ax.scatter(pts[:, 0], c + jitter, s=3, color=colour(c), label=name)
        else:
            ax.scatter(pts[:, 0], pts[:, 1], s=3, color=colour(c), label=name, alpha=0.7)
    if z_dim == 1:
        ax.set_yticks(range(k), names if k <= 20 else None)
        ax.set_ylabel(what)
        ax.set_xlabel("latent mean")
    ax.legend(title=f"{info.name} {what}", markerscale=4, loc="center left",
              bbox_to_anchor=(1, 0.5), ncol=1 if k <= 20 else 3, fontsize="small")  # fmt: skip
    ax.set_title(f"Latent means of {len(xy)} test images, z_dim={z_dim}: {method}")
    save_figure(fig, path)


def tsne(
    params: Params, figure: Path = paths.TSNE_FIGURE, coords: Path = paths.TSNE_COORDS
) -> dict:
    cfg = params.tsne
    run_id = tracking.model_run("tsne")["run_id"]
    vae, _ = load_model(paths.MODEL)
    images, labels = load_split(params.data.out_dir, "test")
    z = vae.latents(images[: cfg.n], labels[: cfg.n]).numpy()
    labels = labels[: cfg.n].numpy()
    xy, method = embed(z, cfg.perplexity, cfg.seed, configure_threads(params.train.threads))
    with staged_outputs() as out:
        plot(xy, labels, load_info(params.data.out_dir), z.shape[1], method, out.path(figure))
        with out.path(coords).open("w", newline="") as fh:  # numpy's shortest float text
            rows = zip(map(str, xy[:, 0]), map(str, xy[:, 1]), labels.tolist(), strict=True)
            csv.writer(fh, lineterminator="\n").writerows([("x", "y", "label"), *rows])
        with tracking.reopen_run(run_id):
            mlflow.log_artifact(str(out.path(figure)), "figures")
    print(f"tsne: {len(z)} test images, {method} -> {figure}")
    return {"n": len(z), "method": method}
