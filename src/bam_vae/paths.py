"""Where every artifact lives: the pipeline's files, the project root, per-machine caches.

Paths are relative to the checkout (the working directory of a stage, as DVC runs it);
what must outlive a ``dvc exp run --temp`` copy lives under :func:`project_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

# prepare-mnist
DATA_DIR = Path("data/prepared")
DATA_METRICS = Path("metrics/data.json")
# train
MODEL = Path("models/vae.pt")
RUN_REF = Path("models/mlflow_run.json")  # the model's MLflow run, for later stages
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/train_history.csv")
# train-evaluator
EVALUATOR = Path("models/evaluator.pt")
EVALUATOR_METRICS = Path("metrics/evaluator.json")
# fid-reference@<space>
FID_REFERENCE_DIR = Path("data/fid_ref")
# fit-sampler
SAMPLER = Path("models/sampler.npz")
SAMPLER_METRICS = Path("metrics/sampler.json")
# generate-1024
GENERATED_DIR = Path("data/generated")
GENERATED = GENERATED_DIR / "images.npy"
FIGURES = Path("figures")
# compute-fid
FID_METRICS = Path("metrics/fid.json")
# tsne
TSNE_FIGURE = FIGURES / "tsne.png"
TSNE_COORDS = Path("metrics/tsne.csv")
# robustness
ROBUSTNESS_FIGURE = FIGURES / "robustness.png"
ROBUSTNESS_METRICS = Path("metrics/robustness.json")
# inspect
MEMORISATION_METRICS = Path("metrics/memorisation.json")
# bam report
REPORTS = Path("reports")


def project_root() -> Path:
    """The real project root, also inside ``dvc exp run --temp`` copies.

    DVC sets ``DVC_ROOT`` to the real repository while a stage runs in a temporary copy,
    so anything that must outlive the copy (the MLflow store, resume checkpoints) goes there.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / ".dvc").is_dir():
            return folder
    return here


def user_cache() -> Path:
    """Per-machine cache shared by every checkout, the tests and CI (fetch once)."""
    base = (
        os.environ.get("BAM_VAE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bam-vae"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_dir() -> Path:
    """Resume files of interrupted loops: under the real project root, so they outlive
    ``dvc exp run --temp`` copies."""
    return project_root() / ".cache" / "checkpoints"


def lock_file() -> Path:
    """One writing command per checkout at a time holds this."""
    return Path(".cache/bam.lock")
