"""Stages ``fid-reference`` and ``compute-fid``: FID, its floor, KID and the digit metrics.

Feature spaces (``fid.features``):
- ``classifier``: the evaluator's penultimate layer (fast; the default);
- ``inception``: pytorch-fid's InceptionV3 pool3 (2048-d), as the report used.

The test-set features of each space are computed once (``fid-reference@<space>``, cached by
DVC) and reused by every model. FID uses pytorch-fid's ``calculate_frechet_distance``. Because
N = 1024 samples bias FID upwards, the same space also gives the *floor* (1024 real test
images against the whole test set) and KID, which is unbiased.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from tqdm import tqdm

from bam_vae import tracking
from bam_vae.checkpoints import config_key
from bam_vae.config import FidConfig, Params
from bam_vae.data import load_split, sha256
from bam_vae.errors import BamError, Interrupted, reason
from bam_vae.evaluator import MODEL_PATH as EVALUATOR_PATH
from bam_vae.evaluator import digit_metrics, label_accuracy, load_evaluator, predict
from bam_vae.paths import atomic_path, exclusive, file_sha256, user_cache, write_json
from bam_vae.train import resolve_device

REF_DIR = Path("data/fid_ref")
GENERATED = Path("data/generated/images.npy")
METRICS_PATH = Path("metrics/fid.json")


# ---------------------------------------------------------------------------- statistics
def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return float(calculate_frechet_distance(*stats(a), *stats(b)))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int, seed: int):
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel.

    Averaged over ``subsets`` random subsets of ``subset_size`` from each set (Bińkowski et
    al. 2018, as in torch-fidelity). Returns (mean, std).
    """
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    dim = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx = (x @ x.T / dim + 1) ** 3
        kyy = (y @ y.T / dim + 1) ** 3
        kxy = (x @ y.T / dim + 1) ** 3
        off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off_diag - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------- feature spaces
def as_images(array: np.ndarray) -> torch.Tensor:
    """N x 28 x 28 (or N x 1 x 28 x 28) floats in [0, 1] -> N x 1 x 28 x 28 tensor."""
    x = torch.as_tensor(np.asarray(array, dtype=np.float32))
    return x.unsqueeze(1) if x.ndim == 3 else x


def feature_extractor(space: str, cfg: FidConfig) -> tuple[Callable, Path]:
    """The feature function of a space, loaded once, and the weights file it comes from."""
    device = resolve_device(cfg.device, "fid.device")
    if space == "classifier":
        evaluator = load_evaluator(EVALUATOR_PATH).to(device)
        return lambda images: predict(evaluator, images)[0], EVALUATOR_PATH
    from bam_vae.inception import FeatureNet, load_inception, resolve_inception_weights

    weights = resolve_inception_weights(cfg.inception_weights)
    return FeatureNet(load_inception(weights, device), cfg.precision), weights


def reference(params: Params, space: str, ref_dir: Path = REF_DIR, chunk: int = 1000) -> Path:
    """Stage ``fid-reference@<space>``: features of the 10 000 test images, computed once per
    machine.

    The features are cached outside the checkout (``$BAM_VAE_CACHE``, else
    ``~/.cache/bam-vae/fid-reference/``), keyed by the network's weights, the test data and the
    precision, so every clone, test run, CI job and queue or Ray worker on this machine reuses
    them (DVC still tracks this stage's output). While computing, each chunk of test images is
    saved as it is done (the Inception space takes many CPU minutes), so an interrupted run
    resumes at the first missing chunk.
    """
    if space not in ("classifier", "inception"):
        raise BamError(
            f"fid.features: unknown feature space {space!r}; expected classifier or inception"
        )
    images, _ = load_split(params.data.out_dir, "test")
    extract, weights = feature_extractor(space, params.fid)
    precision = params.fid.precision if space == "inception" else "fp32"
    key = config_key(file_sha256(weights), sha256(images.numpy()), chunk, precision)
    cache = user_cache() / "fid-reference"
    cached, parts = cache / f"{space}-{key}.npy", cache / f"{space}-{key}.parts"
    out = ref_dir / f"{space}.npy"
    # Workers that start together (a queue, a sweep) compute it once: the others wait, then
    # read the cache, instead of writing the same chunks and removing each other's.
    with exclusive(cache / f".{space}-{key}.lock", f"fid-reference: {cached}", wait=True):
        if cached.is_file():
            feats = load_array(cached, "cached FID reference", "(N, D)", lambda a: a.ndim == 2,
                               "delete it to recompute it")  # fmt: skip
            print(f"fid-reference: {space} features from this machine's cache {cached}")
        else:
            feats = _compute_in_chunks(extract, images, chunk, parts, space)
            with atomic_path(cached) as tmp, tmp.open("wb") as fh:
                np.save(fh, feats)
            shutil.rmtree(parts, ignore_errors=True)
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        np.save(fh, feats)
    print(f"fid-reference: {space} features of {len(feats)} test images -> {out}")
    return out


def _compute_in_chunks(extract, images, chunk: int, parts: Path, space: str) -> np.ndarray:
    x = images.float().div(255.0).unsqueeze(1)
    starts = range(0, len(x), chunk)
    feats = []
    try:
        for i, start in enumerate(tqdm(starts, desc=f"fid-reference {space}", unit="chunk")):
            part = parts / f"{i:05d}.npy"
            if not part.is_file():
                with atomic_path(part) as tmp, tmp.open("wb") as fh:
                    np.save(fh, extract(x[start : start + chunk]))
            feats.append(np.load(part))
    except KeyboardInterrupt:
        raise Interrupted(
            f"fid-reference: interrupted with {len(feats)} of {len(starts)} chunks saved in"
            f" {parts} -- run again to resume"
        ) from None
    return np.concatenate(feats)


def load_array(path: Path, what: str, shape: str, ok: Callable[[np.ndarray], bool], hint: str):
    """A float ``.npy`` array (no pickles) that passes ``ok``; else one line naming the file."""
    if not path.is_file():
        raise BamError(f"{what} {path} not found; {hint}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BamError(f"corrupt {what} {path}: {reason(exc)}; {hint}") from None
    if array.dtype.kind != "f" or not ok(array):
        raise BamError(
            f"corrupt {what} {path}: {array.dtype} array of shape {array.shape}, expected float"
            f" {shape}; {hint}"
        )
    return array


def load_reference(space: str, ref_dir: Path = REF_DIR) -> np.ndarray:
    hint = f"run `bam fid-reference --space {space}`"
    ok = lambda a: a.ndim == 2 and len(a) >= 2  # noqa: E731
    return load_array(ref_dir / f"{space}.npy", "FID reference", "(N >= 2, D)", ok, hint)


def load_generated(path: Path = GENERATED) -> np.ndarray:
    ok = lambda a: a.ndim == 3 and a.shape[1:] == (28, 28) and len(a) > 0  # noqa: E731
    return load_array(path, "generated images", "(N, 28, 28)", ok, "run `bam generate`")


# ---------------------------------------------------------------------------- stage
def score_space(space: str, generated: torch.Tensor, cfg: FidConfig) -> dict[str, float]:
    real = load_reference(space)
    fake = feature_extractor(space, cfg)[0](generated)
    # The floor: as many real test images as there are samples, against the full test set.
    rng = np.random.default_rng(cfg.seed)
    real_subset = real[rng.choice(len(real), min(len(fake), len(real)), replace=False)]
    kid_mean, kid_std = kid(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    return {
        f"fid_{space}": fid(real, fake),
        f"fid_floor_{space}": fid(real, real_subset),
        f"kid_{space}": kid_mean,
        f"kid_std_{space}": kid_std,
    }


def generated_sampler(path: Path = GENERATED) -> str:
    """The sampler that drew the generated images (``meta.json`` beside them)."""
    meta = path.with_name("meta.json")
    if not meta.is_file():
        return "prior"  # written before samplers existed: always z ~ N(0, I)
    try:
        return str(json.loads(meta.read_text())["sampler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BamError(f"corrupt {meta}: {exc}; run `bam generate` again") from None


def compute(params: Params, metrics_path: Path = METRICS_PATH) -> dict:
    """Stage ``compute-fid``: metrics/fid.json, logged into the model's run and version tags.

    In MLflow every metric is named ``<sampler>/<metric>`` (``gmm/fid_classifier``), so one
    run holds one set of scores per sampler it was scored with."""
    cfg = params.fid
    device = resolve_device(cfg.device, "fid.device")
    ref = tracking.read_run_ref()
    tracking.init()  # an unreachable tracking server fails here, before any work
    generated = as_images(load_generated())
    sampler = generated_sampler()
    metrics: dict = {"sampler": sampler, "n_generated": len(generated)}
    for space in cfg.features:
        metrics |= score_space(space, generated, cfg)
    _, probs = predict(load_evaluator(EVALUATOR_PATH).to(device), generated)
    metrics |= digit_metrics(probs, cfg.confidence)
    labels_path = GENERATED.with_name("labels.npy")
    if labels_path.is_file():  # a conditional model: did it draw the digits it was asked for?
        metrics["label_accuracy"] = label_accuracy(probs, np.load(labels_path))

    scalars = {f"{sampler}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    with tracking.reopen_run(ref["run_id"]):
        mlflow.log_metrics(scalars)
        mlflow.log_dict(metrics, f"metrics/fid_{sampler}.json")
    client = tracking.client()
    for key, value in scalars.items():
        client.set_model_version_tag(ref["model_name"], ref["model_version"], key, f"{value:.6g}")
    write_json(metrics_path, metrics)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("fid", "kid")))
    print(f"compute-fid ({sampler}): {summary}, digit entropy {metrics['digit_entropy']:.3f}")
    return metrics
