"""Stage ``compute-fid``: FID, its floor, KID and the class metrics of the generated images."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.files import before_commit, staged_outputs, write_json
from bam_vae.scoring.evaluator import (
    NoClassifier,
    as_images,
    class_metrics,
    label_accuracy,
    load_evaluator,
    predict,
)
from bam_vae.scoring.fid import (
    check_enough,
    generated_sampler,
    load_generated,
    quantize,
    score_space,
)
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import resolve_device


def compute(params: Params, metrics_path: Path = paths.FID_METRICS) -> dict:
    """metrics/fid.json, logged into the model's run and version tags.

    In MLflow every metric is named ``<sampler>/<metric>`` (``gmm/fid_classifier``), so one
    run holds one set of scores per sampler it was scored with."""
    cfg = params.fid
    device = resolve_device(cfg.device, "fid.device")
    ref = tracking.model_run("compute-fid")
    generated = as_images(load_generated())
    check_enough(len(generated))
    recon_path = paths.GENERATED.with_name("reconstructions.npy")
    recon = None
    if recon_path.is_file():  # REC (Ghosh et al. 2020): absent for images from before it
        recon = as_images(load_generated(recon_path, "reconstructions"))
    if cfg.quantize:  # as a saved PNG holds them; the real images are 8-bit already
        generated, recon = quantize(generated), None if recon is None else quantize(recon)
    sampler = generated_sampler()
    # Every score says what it came from: N images, KID's subsets; see `bam promote`.
    metrics: dict = {"sampler": sampler, "n_generated": len(generated)}
    metrics["kid_subsets"] = cfg.kid_subsets
    warnings: list[str] = []
    # What the scores were computed from, so that no ranking mixes protocols (see `bam promote`).
    protocol: dict = {"n_generated": len(generated), "spaces": {},
                      "images": "uint8" if cfg.quantize else "float32"}  # fmt: skip
    for space in cfg.features:
        scores, notes, protocol["spaces"][space] = score_space(space, generated, cfg, recon)
        metrics |= scores
        warnings += notes
    metrics["protocol"] = protocol
    for note in warnings:
        print(f"compute-fid: warning: {note}", file=sys.stderr)
    try:
        evaluator = load_evaluator(paths.EVALUATOR)
    except NoClassifier as why:
        print(f"compute-fid: {why}", file=sys.stderr)
        warnings.append(str(why))
    else:
        _, probs = predict(evaluator.to(device), generated)
        metrics |= class_metrics(probs, cfg.confidence) | {"classes": list(evaluator.classes)}
        labels_path = paths.GENERATED.with_name("labels.npy")
        if labels_path.is_file():  # a conditional model: did it draw the classes asked for?
            metrics["label_accuracy"] = label_accuracy(probs, np.load(labels_path))

    metrics["warnings"] = warnings  # stored with the scores, in fid.json and in MLflow
    scalars = {f"{sampler}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    before_commit()  # params and code as the stage read them, before the version's tags
    with tracking.reopen_run(ref["run_id"]):
        mlflow.log_metrics(scalars)
        mlflow.log_dict(metrics, f"metrics/fid_{sampler}.json")
        mlflow.set_tag(f"{sampler}/protocol", protocol_tag(protocol))
    client = tracking.client()
    for key, value in scalars.items():
        client.set_model_version_tag(ref["model_name"], ref["model_version"], key, f"{value:.6g}")
    with staged_outputs() as out:
        write_json(out.path(metrics_path), metrics)
    shown = [k for k in metrics if k.startswith(("fid", "kid_", "precision", "recall"))]
    shown = [k for k in shown if "subset" not in k]
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in shown)
    entropy = (
        f", class entropy {metrics['class_entropy']:.3f}" if "class_entropy" in metrics else ""
    )
    print(f"compute-fid ({sampler}): {summary}{entropy}")
    return metrics


def protocol_tag(protocol: dict) -> str:
    """One line for the run's tags: ``N=10000 vs 10000 test images; inception fp32, ...``."""
    spaces = ", ".join(
        f"{k} {v['precision']}" + (f" padded to {v['pad_to']}" if v.get("pad_to", 28) != 28 else "")
        for k, v in protocol["spaces"].items()
    )
    reference = next(iter(protocol["spaces"].values()))["reference"]
    images = protocol.get("images", "float32")
    return f"N={protocol['n_generated']} {images} vs {reference}; {spaces}"
