"""Out-of-distribution scores: how well a per-image score tells noise from test images."""

from __future__ import annotations

import numpy as np


def auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (N floats, higher = more positive) for the
    binary labels ``is_positive`` (N, 0/1): the probability that a random positive scores
    above a random negative, ties counting half (Mann-Whitney U / (n_pos * n_neg)).

    The value of ``sklearn.metrics.roc_auc_score`` (tested against it) without importing
    scikit-learn, which costs a stage more start-up than torch itself (``bench/startup.py``).
    Raises ``ValueError`` unless both classes are present."""
    positive = np.asarray(is_positive).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive, {n_neg} negative")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
