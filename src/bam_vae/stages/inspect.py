"""Stage ``inspect``: look at what a model learned, not only at its scores.

Three figures, logged into the model's MLflow run and listed in ``dvc plots``:

- ``figures/nearest.png``: generated images beside their nearest training images in pixel
  space (Euclidean), with the memorisation scores of all generated images
  (:mod:`bam_vae.scoring.memorisation`) in ``metrics/memorisation.json``;
- ``figures/interpolations.png``: decoded paths between the latents of pairs of test images
  (their posterior means): linear, and spherical where the prior is N(0, I) (every arch but
  ``vqvae``, whose decoder input, the quantised 7 x 7 grid, is interpolated linearly); a
  conditional model interpolates within one class;
- ``figures/traversals.png``: the latent dimensions whose posterior means vary most over the
  test images, each moved from -3 to +3 standard deviations around the mean posterior mean.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split
from bam_vae.figures import image_rows
from bam_vae.files import staged_outputs, write_json
from bam_vae.latent_paths import lerp, slerp, traversal
from bam_vae.models.saved import load_model
from bam_vae.scoring.fid import generated_sampler, load_generated
from bam_vae.scoring.memorisation import memorisation, nearest
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import configure_threads

NEIGHBOURS = 5  # training images shown beside each sample


@torch.no_grad()
def inspect(params: Params) -> dict:
    cfg = params.inspect
    ref = tracking.model_run("inspect")
    configure_threads(params.train.threads)
    vae, _ = load_model(paths.MODEL)
    vae.eval()
    samples = torch.as_tensor(load_generated())
    sampler = generated_sampler()
    train, _ = load_split(params.data.out_dir, "train")
    test, test_labels = load_split(params.data.out_dir, "test")
    rng = np.random.default_rng(cfg.seed)

    x = test.float().div(255).unsqueeze(1)
    # Memorisation: every sample, against as many test images (seeded), both to the training set.
    flat_train = train.flatten(1).float().div(255)
    held_out = rng.choice(len(test), min(len(samples), len(test)), replace=False)
    test_dist, _ = nearest(x[held_out].flatten(1), flat_train)
    sample_dist, index = nearest(samples.flatten(1), flat_train, k=NEIGHBOURS)
    scores = memorisation(sample_dist[:, 0], test_dist[:, 0])
    scores |= {"sampler": sampler, "n_samples": len(samples), "n_test": len(held_out)}

    shown = range(min(cfg.rows, len(samples)))
    near_rows = [torch.cat([samples[i, None], train[index[i]].float().div(255)])[:, None]
                 for i in shown]  # fmt: skip
    near_labels = [f"{sample_dist[i, 0]:.2f}" for i in shown]
    near_title = (
        f"{sampler} samples (left), their {NEIGHBOURS} nearest training images (pixel L2,"
        f" distance at left)\ncopy share {scores['copy_share']:.3f}, Meehan Z {scores['mw_z']:.1f}"
    )

    y = test_labels if vae.conditional else None
    z = vae.latents(test, test_labels)
    inter_rows, inter_labels = _interpolations(vae, x, y, z, cfg, rng)
    trav_rows, trav_labels, trav_title = _traversals(vae, y, z, cfg)

    with staged_outputs() as out:
        figures = {name: out.path(paths.FIGURES / f"{name}.png")
                   for name in ("nearest", "interpolations", "traversals")}  # fmt: skip
        image_rows(near_rows, near_labels, near_title, figures["nearest"])
        kind = "linear" if vae.latent_kind == "codes" else "linear and spherical"
        title = f"{kind} interpolations between test images (ends: the images themselves)"
        image_rows(inter_rows, inter_labels, title, figures["interpolations"])
        image_rows(trav_rows, trav_labels, trav_title, figures["traversals"])
        write_json(out.path(paths.MEMORISATION_METRICS), scores)
        with tracking.reopen_run(ref["run_id"]):
            for path in figures.values():
                mlflow.log_artifact(str(path), "figures")
            mlflow.log_metrics({f"{sampler}/{k}": v for k, v in scores.items()
                                if isinstance(v, float)})  # fmt: skip
    print(f"inspect ({sampler}): copy share {scores['copy_share']:.3f} (0.05 if no copying),"
          f" nn ratio {scores['nn_ratio']:.3f}, Meehan Z {scores['mw_z']:.2f};"
          f" figures in {paths.FIGURES}")  # fmt: skip
    return scores


def _decode(vae, z: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
    y = None if label is None else label.expand(len(z))
    return torch.sigmoid(vae.decode(z.to(vae.device), None if y is None else y.to(vae.device)))


def _interpolations(vae, x, y, z, cfg, rng) -> tuple[list[torch.Tensor], list[str]]:
    rows, labels = [], []
    for p in range(cfg.pairs):
        a = int(rng.integers(len(x)))
        # A conditional model decodes one class at a time: its pairs share a class.
        same = np.flatnonzero((y == y[a]).numpy()) if y is not None else np.arange(len(x))
        others = same[same != a]
        b = int(rng.choice(others)) if len(others) else a  # a class with one test image
        label = None if y is None else y[a : a + 1]
        paths_ = [("lin", lerp)] + ([] if vae.latent_kind == "codes" else [("sph", slerp)])
        for name, path in paths_:
            decoded = _decode(vae, path(z[a], z[b], cfg.steps), label).cpu()
            rows.append(torch.cat([x[a : a + 1], decoded, x[b : b + 1]]))
            labels.append(f"{p + 1} {name}")
    return rows, labels


def _traversals(vae, y, z, cfg) -> tuple[list[torch.Tensor], list[str], str]:
    centre, spread = z.mean(0), z.std(0)
    dims = torch.argsort(spread, descending=True)[: cfg.dims].tolist()
    label = None if y is None else y[:1]
    decoded = _decode(vae, traversal(centre, dims, spread, cfg.steps), label).cpu()
    rows = list(decoded.split(cfg.steps))
    labels = [f"z{d} sd {spread[d]:.2f}" for d in dims]
    title = (
        f"the {len(dims)} latent dims with the most varied posterior means, -3 to +3 sd around"
        " the mean posterior mean" + ("" if y is None else f" (class {int(y[0])})")
    )
    return rows, labels, title
