"""The dataset's classifier that scores generated images (trained by stage ``train-evaluator``).

Its penultimate layer (``feature_dim`` ReLU units) is the feature space for a dataset-specific
FID, and its softmax gives class metrics: which classes a generator draws, how evenly, and how
many images look like a clear member of a class at all. It has to be a good classifier (>= 99%
test accuracy on MNIST; each dataset states its own floor) for either to mean anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bam_vae import paths
from bam_vae.config import EvaluatorConfig
from bam_vae.datasets.base import MNIST_CLASSES
from bam_vae.errors import BamError
from bam_vae.models import on_device
from bam_vae.models.saved import load_saved_model


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    # BatchNorm lets Adam at 1e-3 pass 99% within three CPU epochs; in eval mode it uses
    # running stats, so an image's features never depend on the rest of its batch.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Evaluator(nn.Module):
    """Small CNN: 1x28x28 in [0, 1] -> ``feature_dim`` ReLU features -> one logit per class.

    One conv per resolution (28, 14, 7): the usual conv32-conv32-pool-conv64-conv64-pool
    trains about twice as slowly on a CPU for accuracy MNIST scoring does not need.
    """

    def __init__(self, feature_dim: int = 128, classes: tuple[str, ...] = MNIST_CLASSES) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.body = nn.Sequential(
            *_conv(1, 32),
            nn.MaxPool2d(2),
            *_conv(32, 64),
            nn.MaxPool2d(2),
            *_conv(64, 64),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, len(self.classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def as_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels or floats in [0, 1], N x 28 x 28 or N x 1 x 28 x 28 -> float N x 1 x 28 x 28."""
    x = torch.as_tensor(images)
    # Raw uint8 pixels would silently give nonsense features; scale them like the training data.
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    return x.unsqueeze(1) if x.dim() == 3 else x


def saved_config(cfg: EvaluatorConfig, classes: tuple[str, ...]) -> dict:
    """The config saved with the weights: the params and the class names of its dataset."""
    return cfg.model_dump() | {"classes": list(classes)}


class NoClassifier(BamError):
    """The data has no labels, so ``train-evaluator`` trained no classifier."""


def load_evaluator(path: str | Path = paths.EVALUATOR) -> Evaluator:
    """Load the classifier written by stage ``train-evaluator``, in eval mode, on the CPU
    (a file without class names is MNIST's). Raises :class:`NoClassifier` for data without
    labels (the file then records that no classifier exists), BamError for a bad file."""

    def no_labels(config: dict, _state_dict: dict) -> None:
        if config.get("classes") == []:
            raise NoClassifier(
                f"{path}: the dataset has no labels, so there is no classifier: its feature"
                " space and class metrics are skipped; expected fid.features=[inception] for"
                " such data"
            )

    def build(config: dict) -> Evaluator:
        rest = {k: v for k, v in config.items() if k != "classes"}
        classes = tuple(map(str, config.get("classes", MNIST_CLASSES)))
        return Evaluator(EvaluatorConfig.model_validate(rest).feature_dim, classes)

    return load_saved_model(path, "evaluator", "run `bam train-evaluator`", build, no_labels)[0]


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def predict(
    model: Evaluator, images: torch.Tensor | np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(features N x feature_dim, probabilities N x classes), float64, for images in [0, 1].

    Images may be N x 1 x 28 x 28 or N x 28 x 28; the model is put in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    (x,) = on_device(device, as_images(images))  # moved once, not per batch
    feats, probs = [], []
    for start in range(0, len(x), batch_size):
        f = model.features(x[start : start + batch_size])
        feats.append(f.double().cpu())
        probs.append(torch.softmax(model.head(f).double(), dim=1).cpu())
    if not feats:
        return np.zeros((0, model.head.in_features)), np.zeros((0, model.head.out_features))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) == 0:
        raise ValueError(f"expected probabilities of shape (N>0, K>=2), got {probs.shape}")
    return probs


def class_metrics(probs: np.ndarray, threshold: float = 0.9) -> dict:
    """Share of each predicted class, its normalised entropy, and the share of confident images.

    ``probs``: N x K softmax outputs. ``class_entropy`` is 1 when all K classes are predicted
    equally often and 0 when only one is (mode collapse); ``confident_share`` is low for
    blurry or ambiguous images. (Named ``digit_*`` before datasets other than MNIST.)
    """
    probs = _check_probs(probs)
    k = probs.shape[1]
    hist = np.bincount(probs.argmax(axis=1), minlength=k) / len(probs)
    seen = hist[hist > 0]
    # sum p * log(1/p) rather than -sum p * log(p): no -0.0 when a single class takes all.
    entropy = float((seen * np.log(1.0 / seen)).sum() / math.log(k))
    return {
        "class_histogram": [float(h) for h in hist],
        "class_entropy": entropy,
        "confident_share": float((probs.max(axis=1) >= threshold).mean()),
    }


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    probs = _check_probs(probs)
    return float((probs.argmax(axis=1) == np.asarray(labels)).mean())
