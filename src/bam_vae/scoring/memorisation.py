"""Are samples copies of training images? Nearest training images and the memorisation scores.

Distances are Euclidean in pixel space (28 x 28 values in [0, 1], so 0 .. 28): no network
decides what "close" means, and it works for data without labels. What counts as close comes
from held-out data: the test images' distances to their nearest training image.

- ``copy_share``: share of samples closer to their nearest training image than 95 % of the
  test images are to theirs (the test images' 5th percentile): about 0.05 for a generator that
  does not copy, 1.0 for one that returns training images.
- ``nn_ratio``: median sample distance over median test distance (below 1: samples sit closer to
  the training set than unseen real images do).
- ``mw_z``: the Mann-Whitney U test of Meehan et al. (2020, "A Non-Parametric Test to Detect
  Data-Copying in Generative Models"), their statistic on one cell: the Z-score of U comparing
  sample and test distances. Below about -3: data-copying; above +3: samples are farther from the
  training set than test images (under-fitting).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import mannwhitneyu


@torch.no_grad()
def nearest(
    queries: torch.Tensor, train: torch.Tensor, k: int = 1, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (float64, N x k, ascending) and indices (int64, N x k) of the ``k`` nearest
    rows of ``train`` (M x D floats) to each row of ``queries`` (N x D), by exact search in
    float64 (``torch.cdist``), ``chunk`` queries at a time."""
    train = train.double()
    dists, index = [], []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk].double(), train)
        values, where = d.topk(k, dim=1, largest=False)
        dists.append(values.numpy())
        index.append(where.numpy())
    return np.concatenate(dists), np.concatenate(index)


def memorisation(sample_dist: np.ndarray, test_dist: np.ndarray) -> dict[str, float]:
    """The scores above from the nearest-training-image distances of the samples (N) and of
    held-out test images (M), both 1-D floats, N, M >= 2."""
    threshold = float(np.quantile(test_dist, 0.05))
    u = mannwhitneyu(sample_dist, test_dist, alternative="two-sided").statistic
    n, m = len(sample_dist), len(test_dist)
    z = (u - n * m / 2) / np.sqrt(n * m * (n + m + 1) / 12)
    return {
        "copy_share": float(np.mean(sample_dist < threshold)),
        "nn_ratio": float(np.median(sample_dist) / np.median(test_dist)),
        "mw_z": float(z),
        "nn_median_sample": float(np.median(sample_dist)),
        "nn_median_test": float(np.median(test_dist)),
        "nn_threshold": threshold,
    }
