"""FID, its floor, KID and the feature spaces they are computed in.

Feature spaces (``fid.features``):
- ``classifier``: the evaluator's penultimate layer (fast; the default);
- ``inception``: pytorch-fid's InceptionV3 pool3 (2048-d), as the report used.

The test-set features of each space are computed once (stage ``fid-reference@<space>``) and
reused by every model (stage ``compute-fid``). FID is :func:`frechet_distance` (pytorch-fid's
formula, with any scipy). Because N samples bias FID upwards (N = 1024 by several points), the
same space also gives the *floor* (N held-out training images against the test set: what a
perfect generator scores at this N), KID, which is unbiased, and precision/recall and
density/coverage (:func:`precision_recall`), which tell sample quality from coverage.

The same spaces score reconstructions (Ghosh et al. 2020's REC column): the posterior-mean
reconstructions of the floor's training images (:func:`rec_indices`), written by
``generate-1024``, scored against the same test features as the samples. The floor bounds
both; REC bounds the samples of a good sampler (docs/results.md).

The literature's MNIST protocol (Heusel et al. 2017; the tables of Ghosh et al. 2020 and Dai &
Wipf 2019) is 10 000 samples against the 10 000 test images in Inception pool3 features, fp32:
``generate.n=10000`` with ``fid.features=[classifier,inception]`` (docs/results.md). RAE's code
also zero-pads the images to 32 x 32 before Inception and scores 8-bit images
(``fid.pad_to: 32``, ``fid.quantize: true``).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bam_vae import paths
from bam_vae.config import FidConfig
from bam_vae.errors import BamError, reason
from bam_vae.scoring.evaluator import load_evaluator, predict
from bam_vae.training.runtime import resolve_device


# ---------------------------------------------------------------------------- statistics
def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D) and covariance (D x D, float64) of features (N x D)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    Means (D) and covariances (D x D) in float64. As pytorch-fid's
    ``calculate_frechet_distance`` computes it (tested against it): if the square root of a
    nearly singular product is not finite, ``eps`` is added to both diagonals; an imaginary
    part above 1e-3 on the diagonal raises ``ValueError``, a smaller one (rounding) is
    dropped. ``scipy.linalg.sqrtm`` is called without the ``disp`` argument that scipy 1.18
    removed and pytorch-fid 0.3.0 still passes, so any scipy works."""
    import warnings

    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Fréchet distance: means {mu1.shape} vs {mu2.shape} and covariances"
            f" {sigma1.shape} vs {sigma2.shape}; expected the same shapes"
        )
    with warnings.catch_warnings():  # "singular matrix": handled below, not news to a user
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            raise ValueError(f"Fréchet distance: imaginary component {largest:.3g} in sqrtm")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N x D each)."""
    return frechet_distance(*stats(a), *stats(b))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int, seed: int):
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel.

    Averaged over ``subsets`` random subsets of ``subset_size`` from each set (Bińkowski et
    al. 2018, as in torch-fidelity). Returns (mean, std).
    """
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID: subsets of {m} image(s); expected at least 2 per set")
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
def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to 8 bits (what a saved PNG holds), still floats in [0, 1]."""
    return images.clamp(0, 1).mul(255).round().div(255)


def pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """N x 1 x H x W images zero-padded on all sides to ``size`` x ``size`` (RAE's protocol:
    MNIST 28 -> 32, 2 black pixels each side); unchanged when already that size."""
    extra = size - images.shape[-1]
    if extra < 0:
        raise BamError(f"fid.pad_to: {size} is smaller than the images ({images.shape[-1]} px)")
    if extra == 0:
        return images
    before = extra // 2
    return torch.nn.functional.pad(images, (before, extra - before, before, extra - before))


def feature_extractor(space: str, cfg: FidConfig) -> tuple[Callable, Path]:
    """The feature function of a space, loaded once, and the weights file it comes from.

    The Inception space zero-pads images to ``fid.pad_to`` first; the classifier space sees
    the 28 x 28 images its evaluator was trained on."""
    device = resolve_device(cfg.device, "fid.device")
    if space == "classifier":
        evaluator = load_evaluator(paths.EVALUATOR).to(device)
        return lambda images: predict(evaluator, images)[0], paths.EVALUATOR
    from bam_vae.scoring.inception import FeatureNet, load_inception, resolve_inception_weights

    weights = resolve_inception_weights(cfg.inception_weights)
    net = FeatureNet(load_inception(weights, device), cfg.precision)
    return lambda images: net(pad(images, cfg.pad_to)), weights


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


def reference_path(space: str, split: str, ref_dir: Path = paths.FID_REFERENCE_DIR) -> Path:
    """``<space>.npy`` (the test images) or ``<space>-train.npy`` (the floor's training images)."""
    return ref_dir / (f"{space}.npy" if split == "test" else f"{space}-{split}.npy")


def load_reference(
    space: str, split: str = "test", ref_dir: Path = paths.FID_REFERENCE_DIR
) -> np.ndarray:
    hint = f"run `bam fid-reference --space {space}`"
    ok = lambda a: a.ndim == 2 and len(a) >= 2  # noqa: E731
    path = reference_path(space, split, ref_dir)
    return load_array(path, "FID reference", "(N >= 2, D)", ok, hint)


def load_generated(path: Path = paths.GENERATED, what: str = "generated images") -> np.ndarray:
    ok = lambda a: a.ndim == 3 and a.shape[1:] == (28, 28) and len(a) > 0  # noqa: E731
    return load_array(path, what, "(N, 28, 28)", ok, "run `bam generate`")


def floor_indices(n_train: int, floor_n: int, seed: int) -> np.ndarray:
    """The training images of the FID floor: ``min(floor_n, n_train)`` of them, seeded, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, min(floor_n, n_train), replace=False))


def rec_indices(n_train: int, n: int, cfg: FidConfig) -> np.ndarray:
    """The training images whose reconstructions make the REC column: the ``min(n, floor_n)``
    floor images that :func:`score_space` draws for the floor at N = ``n``, in its order, so
    REC and the floor score the same originals."""
    floor = floor_indices(n_train, cfg.floor_n, cfg.seed)
    return floor[_floor_draw(np.random.default_rng(cfg.seed), len(floor), n)]


def _floor_draw(rng: np.random.Generator, n_floor: int, n: int) -> np.ndarray:
    return rng.choice(n_floor, min(n, n_floor), replace=False)


# ---------------------------------------------------------------------------- stage
def check_enough(n: int, path: Path = paths.GENERATED) -> None:
    """FID needs a covariance and KID pairs of images: refuse fewer than 2 images, in one line."""
    if n < 2:
        raise BamError(
            f"compute-fid: {n} generated image in {path} cannot define a covariance; FID and"
            " KID need at least 2 -- expected generate.n >= 2 (1024 to compare with the report)"
        )


def score_space(
    space: str, generated: torch.Tensor, cfg: FidConfig, recon: torch.Tensor | None = None
) -> tuple[dict[str, float], list[str], dict]:
    """The scores of ``generated`` (N x 1 x 28 x 28 floats in [0, 1], N >= 2) in one feature
    space: FID against the test images, its floor, KID with the subset size actually used,
    precision, recall, density and coverage; with ``recon`` (the reconstructions of
    :func:`rec_indices`, same layout) also ``fid_recon_<space>`` and its precision and recall;
    warnings for scores N makes unreliable; and what they were computed from (images,
    network, precision, padding) for the run's protocol record."""
    real = load_reference(space)
    train = load_reference(space, "train")
    extract = feature_extractor(space, cfg)[0]
    fake = extract(generated)
    n, dim = fake.shape
    rng = np.random.default_rng(cfg.seed)
    # The floor: as many real training images as there are samples, against the test images:
    # the FID of a perfect generator at this N (held-out images, as samples are).
    floor = train[_floor_draw(rng, len(train), n)]
    # P/R compare sets of equal size (Kynkäänniemi et al. 2019): N test images, seeded.
    real_n = real[rng.choice(len(real), min(n, len(real)), replace=False)]
    subset_size = min(cfg.kid_subset_size, len(real), n)
    kid_mean, kid_std = kid(real, fake, cfg.kid_subsets, subset_size, cfg.seed)
    warnings = []
    if n < dim:
        warnings.append(
            f"fid_{space} from {n} images in a {dim}-d feature space: fewer images than"
            " dimensions make the covariance singular and FID biased upwards; compare it only"
            " with scores from the same number of images"
        )
    if len(floor) < n:
        warnings.append(
            f"fid_floor_{space} from {len(floor)} training images, fewer than the {n} generated"
            f" (fid.floor_n={cfg.floor_n}): the floor is biased upwards"
        )
    if subset_size < cfg.kid_subset_size:
        warnings.append(
            f"kid_{space} from subsets of {subset_size} images, not"
            f" fid.kid_subset_size={cfg.kid_subset_size} (only {n} generated)"
        )
    scores = {
        f"fid_{space}": fid(real, fake),
        f"fid_floor_{space}": fid(real, floor),
        f"kid_{space}": kid_mean,
        f"kid_std_{space}": kid_std,
        f"kid_subset_size_{space}": subset_size,
    }
    enough = min(n, len(real_n)) > DC_K + 1
    if enough:
        scores |= {f"{k}_{space}": v for k, v in precision_recall(real_n, fake).items()}
    else:
        warnings.append(f"precision/recall_{space}: {n} images, expected more than {DC_K + 1}")
    if recon is not None:
        rebuilt = extract(recon)
        scores[f"fid_recon_{space}"] = fid(real, rebuilt)
        if enough and len(rebuilt) > DC_K + 1:
            pr = precision_recall(real_n, rebuilt)
            scores |= {f"{k}_recon_{space}": pr[k] for k in ("precision", "recall")}
    protocol = {
        "network": NETWORKS[space],
        "dim": dim,
        "precision": cfg.precision if space == "inception" else "fp32",
        "pad_to": cfg.pad_to if space == "inception" else 28,
        "reference": f"{len(real)} test images",
        "floor": f"{len(floor)} training images against the {len(real)} test images",
        "precision_recall": f"{len(real_n)} test images; prdc, P/R k={PR_K}, D/C k={DC_K}",
    }
    if recon is not None:
        protocol["recon"] = f"posterior-mean reconstructions of {len(recon)} floor training images"
    return scores, warnings, protocol


NETWORKS = {
    "classifier": "the dataset's evaluator (models/evaluator.pt), penultimate layer",
    "inception": "pytorch-fid InceptionV3 pool3 (pt_inception-2015-12-05-6726825d.pth)",
}
PR_K = 3  # improved precision/recall: k-NN radii of Kynkäänniemi et al. 2019
DC_K = 5  # density/coverage: Naeem et al. 2020's recommended k


def precision_recall(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019; k = 3 nearest neighbours) and
    density and coverage (Naeem et al. 2020; k = 5) of ``fake`` (M x D) against ``real``
    (N x D) features, both more than 6 rows, computed by the ``prdc`` package (Naeem et al.'s
    code) in float32. Precision, recall and coverage are shares in [0, 1]; density is >= 0,
    about 1 when the two sets come from one distribution."""
    from prdc import compute_prdc

    real32, fake32 = (np.ascontiguousarray(a, dtype=np.float32) for a in (real, fake))
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        pr = compute_prdc(real32, fake32, PR_K)
        dc = compute_prdc(real32, fake32, DC_K)
    return {
        "precision": float(pr["precision"]), "recall": float(pr["recall"]),
        "density": float(dc["density"]), "coverage": float(dc["coverage"]),
    }  # fmt: skip


def generated_sampler(path: Path = paths.GENERATED) -> str:
    """The sampler that drew the generated images (``meta.json`` beside them)."""
    meta = path.with_name("meta.json")
    if not meta.is_file():
        return "prior"  # written before samplers existed: always z ~ N(0, I)
    try:
        return str(json.loads(meta.read_text())["sampler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BamError(f"corrupt {meta}: {exc}; run `bam generate` again") from None
