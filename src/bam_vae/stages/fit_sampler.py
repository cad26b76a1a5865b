"""Stage ``fit-sampler``: fit ``generate.sampler`` to the training set under the trained model.

``auto`` resolves to the model's default (gmm on the posterior means; pixelcnn on a VQ-VAE's
codes). Writes ``models/sampler.npz`` (see ``samplers/base.py``) and ``metrics/sampler.json``
(the kind fitted, the param asked for, fit time, log-likelihood...), and logs the file into the
model's MLflow run as ``sampler/<kind>.npz``, so a registered version carries every sampler
fitted to it. The stage depends only on the model, the data and the sampler params: a sampler
sweep never retrains a VAE.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split
from bam_vae.files import file_sha256, staged_outputs, write_json
from bam_vae.models.saved import load_model
from bam_vae.samplers import sampler_for
from bam_vae.tracking import registry
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import resolve_device


def fit_sampler(
    params: Params,
    model_path: Path = paths.MODEL,
    out: Path = paths.SAMPLER,
    metrics_path: Path = paths.SAMPLER_METRICS,
) -> dict:
    cfg = params.generate
    ref = tracking.model_run("fit-sampler")
    vae, _ = load_model(model_path)
    vae.to(resolve_device(cfg.device, "generate.device"))
    sampler = sampler_for(cfg, vae)
    start = time.perf_counter()
    metrics: dict = {"sampler": sampler.kind, "sampler_param": cfg.sampler, "z_dim": vae.z_dim}
    if sampler.kind != "prior":
        images, labels = load_split(params.data.out_dir, "train")
        inputs = sampler.encode(vae, images, labels)
        metrics |= {"n_latents": len(inputs)} | sampler.fit(inputs, labels)
    metrics["fit_seconds"] = round(time.perf_counter() - start, 3)

    # Logged first, moved into place last: a failure leaves the earlier files as they were.
    with tempfile.TemporaryDirectory() as tmp, staged_outputs() as staged:
        logged = Path(tmp) / f"{sampler.kind}.npz"  # the artifact's name in the run
        sampler.save(logged, file_sha256(model_path))
        skip = ("sampler", "sampler_param")
        scalars = {f"{sampler.kind}/{k}": v for k, v in metrics.items() if k not in skip}
        with tracking.reopen_run(ref["run_id"]):
            mlflow.log_artifact(str(logged), "sampler")
            mlflow.log_metrics(scalars)
            mlflow.set_tag(f"{sampler.kind}/config", json.dumps(sampler.config()))
        registry.add_sampler(ref, logged, sampler.kind)  # the registered version serves it
        staged.path(out).write_bytes(logged.read_bytes())
        write_json(staged.path(metrics_path), metrics)
    print(f"fit-sampler: {sampler.kind} fitted in {metrics['fit_seconds']:.1f} s -> {out}")
    return metrics
