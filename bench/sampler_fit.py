"""Sampler fitting time: encoding the 60 000 training images, then fitting each sampler.

For the pipeline's model, or registered versions (``models:/bam-vae-cnn/7``), at the params in
``params.yaml``; the 10 000-sample ``prior`` draw is the baseline every fit is compared with.
For ``gmm``, scikit-learn's ``GaussianMixture`` with the same settings is fitted to the same
points too (the library our EM replaces): its time, iterations and mean log-likelihood on
all latents beside ours.

    python bench/sampler_fit.py [--model models:/bam-vae-cnn/7 ...] [--kinds gmm two-stage]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bam_vae.config import load_params
from bam_vae.datasets import load_split
from bam_vae.models.saved import load_model
from bam_vae.samplers import sampler_for
from bam_vae.tracking.store import resolve_model
from bam_vae.training.runtime import configure_threads


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def scikit_learn_gmm(cfg, latents: np.ndarray, ours_s: float) -> None:
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(cfg.seed)  # the subset GmmSampler fits
    subset = latents
    if len(latents) > cfg.max_points:
        subset = latents[np.sort(rng.choice(len(latents), cfg.max_points, False))]
    gm = GaussianMixture(cfg.components, covariance_type=cfg.covariance, max_iter=cfg.max_iter,
                         reg_covar=1e-6, random_state=cfg.seed)  # fmt: skip
    _, fit_s = timed(gm.fit, subset)
    print(
        f"  gmm, scikit-learn: fit {fit_s:.1f} s (ours {fit_s / ours_s:.1f}x faster);"
        f" {gm.n_iter_} iterations, gmm_loglik {gm.score(latents):.6g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="MLflow model URI (repeatable)")
    parser.add_argument("--kinds", nargs="+", default=["gmm", "two-stage"])
    args = parser.parse_args()
    params = load_params("params.yaml")
    threads = configure_threads(params.train.threads)
    print(f"torch threads: {threads}")
    for uri in args.model or [None]:
        vae, _ = load_model(resolve_model(uri)[0])
        prior = sampler_for(params.generate.model_copy(update={"sampler": "prior"}), vae)
        images, labels = load_split(params.data.out_dir, "train")
        latents, encode_s = timed(prior.encode, vae, images, labels)
        _, draw_s = timed(prior.draw, vae, 10_000, torch.Generator(), None)
        print(f"{uri or 'models/vae.pt'} (z = {vae.z_dim}): encode 60 000 images {encode_s:.1f} s,"
              f" decode 10 000 prior samples {draw_s:.1f} s")  # fmt: skip
        for kind in args.kinds:
            cfg = params.generate.model_copy(update={"sampler": kind})
            sampler = sampler_for(cfg, vae)
            info, fit_s = timed(sampler.fit, latents, labels)
            extra = ", ".join(f"{k} {v:.6g}" for k, v in info.items())
            print(f"  {kind}: fit {fit_s:.1f} s ({fit_s / draw_s:.1f}x the prior draw); {extra}")
            if kind == "gmm" and not vae.conditional and vae.z_dim <= cfg.max_dim:
                scikit_learn_gmm(cfg.gmm, latents.double().numpy(), fit_s)


if __name__ == "__main__":
    main()
