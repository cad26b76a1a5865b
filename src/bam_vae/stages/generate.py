"""Stage ``generate-1024``: decode ``generate.n`` latents drawn by ``generate.sampler``, and
reconstruct.

Writes ``data/generated/images.npy`` (float32, N x 28 x 28, values in [0, 1]; for a
conditional model also ``labels.npy``, the classes asked for; ``meta.json`` names the sampler),
``reconstructions.npy`` (the same layout: posterior-mean reconstructions of the N training
images of the FID floor, :func:`bam_vae.scoring.fid.rec_indices`, for compute-fid's REC column),
the sample grid ``figures/samples.png`` (32 x 32 for 1024) and ``figures/reconstructions.png``:
the first ``generate.per_class`` test images of each class (of the first 10 classes, in
test-set order) above their reconstructions from the posterior mean. Both PNGs are logged
into the model's MLflow run.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import torch

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split, reconstruction_set
from bam_vae.errors import BamError
from bam_vae.figures import image_grid, image_rows
from bam_vae.files import staged_outputs, write_json
from bam_vae.models.base import on_device
from bam_vae.models.saved import load_model
from bam_vae.samplers import fitted_sampler, sample, sample_labels
from bam_vae.scoring.fid import rec_indices
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import resolve_device


def generate(
    params: Params,
    model_uri: str | None = None,
    label: int | None = None,
    out_dir: Path = paths.GENERATED_DIR,
    fig_dir: Path = paths.FIGURES,
) -> dict:
    cfg = params.generate
    device = resolve_device(cfg.device, "generate.device")
    if model_uri is None:  # the pipeline's model: its run and version must still be there
        tracking.model_run("generate")
    else:
        tracking.init()  # an unreachable tracking server fails here, before any work
    model_path, run_id = tracking.resolve_model(model_uri)
    vae, _ = load_model(model_path)
    vae.to(device)
    sampler = fitted_sampler(cfg, vae, model_path, run_id if model_uri else None)
    if label is not None and not vae.conditional:
        raise BamError(f"--class {label}: model {type(vae).__name__} is not conditional (use cvae)")
    if label is not None and label >= vae.n_classes:
        raise BamError(
            f"--class {label}: the model has {vae.n_classes} classes;"
            f" expected 0..{vae.n_classes - 1}"
        )
    labels = sample_labels(cfg.n, cfg.seed, label, vae.n_classes) if vae.conditional else None
    images = sample(vae, sampler, cfg.n, cfg.seed, labels)
    x, y = reconstruction_set(params.data.out_dir, cfg.per_class)
    with torch.no_grad():
        rebuilt = vae.reconstruct(*on_device(device, x, y if vae.conditional else None)).cpu()
    rec = floor_reconstructions(vae, params, cfg.n)

    # Written aside, logged, then moved into place together: a failure changes nothing.
    with staged_outputs() as out:
        np.save(out.path(out_dir / "images.npy"), images[:, 0].numpy().astype(np.float32))
        np.save(out.path(out_dir / "reconstructions.npy"), rec)
        if labels is None:
            out.remove(out_dir / "labels.npy")
        else:  # the classes asked for, for label accuracy in compute-fid
            np.save(out.path(out_dir / "labels.npy"), labels.numpy())
        meta = {"sampler": sampler.kind, "n": cfg.n, "seed": cfg.seed,
                "model_uri": model_uri or str(paths.MODEL)}  # fmt: skip
        write_json(out.path(out_dir / "meta.json"), meta)
        grid, recon = out.path(fig_dir / "samples.png"), out.path(fig_dir / "reconstructions.png")
        image_grid(images, grid, nrow=math.ceil(math.sqrt(cfg.n)))
        title = f"first {cfg.per_class} test images of each class (top) and reconstructions"
        image_rows([x, rebuilt], ["test", "recon"], title + " (bottom)", recon)
        with tracking.reopen_run(run_id):
            mlflow.log_artifact(str(grid), f"figures/{sampler.kind}")
            mlflow.log_artifact(str(recon), "figures")
    print(f"generate: {cfg.n} images ({sampler.kind} sampler) -> {out_dir / 'images.npy'},"
          f" figures in {fig_dir}")  # fmt: skip
    return {"n": cfg.n, "run_id": run_id, "sampler": sampler.kind}


@torch.no_grad()
def floor_reconstructions(vae, params: Params, n: int) -> np.ndarray:
    """Posterior-mean reconstructions of the ``min(n, fid.floor_n)`` floor training images
    (float32, n x 28 x 28, in [0, 1]): Ghosh et al. 2020's REC, scored by compute-fid."""
    images, labels = load_split(params.data.out_dir, "train")
    idx = torch.as_tensor(rec_indices(len(images), n, params.fid))
    return vae.reconstructions(images[idx], labels[idx])[:, 0].numpy().astype(np.float32)
