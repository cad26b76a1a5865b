"""Stage ``train-evaluator``: the MNIST classifier that scores generated digits.

Its penultimate layer (``feature_dim`` ReLU units) is the feature space for an MNIST-specific
FID, and its softmax gives digit metrics: which digits a generator draws, how evenly, and how
many images look like a clear digit at all. It has to be a good classifier (>= 99% test
accuracy) for either to mean anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bam_vae.checkpoints import Checkpoint, checkpoint_path, config_key, stop_on_signals
from bam_vae.config import EvaluatorConfig
from bam_vae.data import data_sha256, load_split
from bam_vae.models import adam, n_parameters, on_device
from bam_vae.paths import load_saved_model, save_torch, staged_outputs, write_json
from bam_vae.train import (
    configure_threads,
    epoch_order,
    fast_path,
    resolve_device,
    seed_everything,
)

MODEL_PATH = Path("models/evaluator.pt")
METRICS_PATH = Path("metrics/evaluator.json")
MIN_ACCURACY = 0.99


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    # BatchNorm lets Adam at 1e-3 pass 99% within three CPU epochs; in eval mode it uses
    # running stats, so an image's features never depend on the rest of its batch.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Evaluator(nn.Module):
    """Small CNN: 1x28x28 in [0, 1] -> ``feature_dim`` ReLU features -> 10 logits.

    One conv per resolution (28, 14, 7): the usual conv32-conv32-pool-conv64-conv64-pool
    trains about twice as slowly on a CPU for accuracy MNIST scoring does not need.
    """

    def __init__(self, feature_dim: int = 128) -> None:
        super().__init__()
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
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(images)
    # Raw uint8 pixels would silently give nonsense features; scale them like the training data.
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    return x.unsqueeze(1) if x.dim() == 3 else x


# ---------------------------------------------------------------------------- training
@torch.no_grad()
def _test_metrics(model: Evaluator, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), 1000):
        logits = model(x[start : start + 1000])
        yb = y[start : start + 1000]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    model.train()
    return correct / len(x), loss / len(x)


def train_evaluator(
    cfg: EvaluatorConfig,
    data_dir: str | Path,
    model_path: Path = MODEL_PATH,
    metrics_path: Path = METRICS_PATH,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Run the stage: write the classifier and its test metrics; return the metrics.

    Interruptible like ``train``: SIGINT/SIGTERM leave a checkpoint and the next run with the
    same config resumes to the same weights. ``on_batch(step)`` runs after each step (tests).
    """
    device = resolve_device(cfg.device, "evaluator.device")
    configure_threads(cfg.threads)
    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    key = config_key(cfg.model_dump(), data_sha256(train_images, test_images))
    x_train, y_train, x_test, y_test = on_device(
        device, _as_images(train_images), train_labels, _as_images(test_images), test_labels
    )

    seed_everything(cfg.seed)
    model = Evaluator(cfg.feature_dim).to(device)
    # Row-major in fp32, as it always was: its weights are the FID feature space, which no
    # speed setting should move, and it trains once per machine (~1 min), so a faster layout
    # would buy little.
    autocast = fast_path(model, cfg.precision, device, channels_last=False)
    optimizer = adam(model.parameters(), cfg.lr)
    n_batches = -(-len(x_train) // cfg.batch_size)
    # Decaying the rate to zero over the run lets the last epoch settle instead of bouncing.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * n_batches)
    ckpt = Checkpoint(checkpoint_path(key, "evaluator"), model, [optimizer, schedule], "evaluator")
    state = ckpt.resume()
    model.train()
    with stop_on_signals() as stopped:
        for epoch in range(state.epoch, cfg.epochs):
            order = epoch_order(len(x_train), cfg.seed, epoch).to(device)
            bar = tqdm(total=n_batches, initial=state.batch, unit="batch", leave=False,
                       desc=f"evaluator epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
                       mininterval=1.0)  # fmt: skip
            for b in range(state.batch, n_batches):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                with autocast():
                    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                state.sums["loss"] = state.sums.get("loss", 0.0) + loss.item()
                state.batch = b + 1
                bar.set_postfix(loss=f"{state.sums['loss'] / (b + 1):.4f}", refresh=False)
                ckpt.end_batch(state, bar, epoch * n_batches + b + 1, on_batch, stopped)
            bar.close()
            accuracy, test_loss = _test_metrics(model, x_test, y_test)
            print(
                f"evaluator epoch {epoch + 1}/{cfg.epochs}: train loss"
                f" {state.sums['loss'] / n_batches:.4f}, test loss {test_loss:.4f},"
                f" test accuracy {accuracy:.4f}"
            )
            state.history.append({"test_accuracy": accuracy, "test_loss": test_loss})
            state.epoch, state.batch, state.sums = epoch + 1, 0, {}
            ckpt.save(state)

    model.cpu().to(memory_format=torch.contiguous_format)
    metrics = {
        **state.history[-1],
        "epochs": cfg.epochs,
        "n_parameters": n_parameters(model),
    }
    with staged_outputs() as out:
        blob = {"config": cfg.model_dump(), "state_dict": model.state_dict()}
        save_torch(blob, out.path(model_path))
        write_json(out.path(metrics_path), metrics)
    ckpt.remove()
    if metrics["test_accuracy"] < MIN_ACCURACY:
        print(
            f"evaluator: warning: test accuracy {metrics['test_accuracy']:.4f} is below"
            f" {MIN_ACCURACY};"
            " FID features and digit metrics from it are unreliable (train longer?)"
        )
    return metrics


def load_evaluator(path: str | Path = MODEL_PATH) -> Evaluator:
    """Load the classifier written by :func:`train_evaluator`, in eval mode, on the CPU."""
    build = lambda config: Evaluator(EvaluatorConfig.model_validate(config).feature_dim)  # noqa: E731
    return load_saved_model(path, "evaluator", "run `bam train-evaluator`", build)[0]


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def predict(
    model: Evaluator, images: torch.Tensor | np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(features N x feature_dim, probabilities N x 10), both float64, for images in [0, 1].

    Images may be N x 1 x 28 x 28 or N x 28 x 28; the model is put in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    (x,) = on_device(device, _as_images(images))  # moved once, not per batch
    feats, probs = [], []
    for start in range(0, len(x), batch_size):
        f = model.features(x[start : start + batch_size])
        feats.append(f.double().cpu())
        probs.append(torch.softmax(model.head(f).double(), dim=1).cpu())
    if not feats:
        return np.zeros((0, model.head.in_features)), np.zeros((0, 10))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 10 or len(probs) == 0:
        raise ValueError(f"expected probabilities of shape (N>0, 10), got {probs.shape}")
    return probs


def digit_metrics(probs: np.ndarray, threshold: float = 0.9) -> dict:
    """Share of each predicted digit, its normalised entropy, and the share of confident images.

    ``digit_entropy`` is 1 when all ten digits are predicted equally often and 0 when only one
    is (mode collapse); ``confident_share`` is low for blurry or ambiguous images.
    """
    probs = _check_probs(probs)
    hist = np.bincount(probs.argmax(axis=1), minlength=10) / len(probs)
    seen = hist[hist > 0]
    # sum p * log(1/p) rather than -sum p * log(p): no -0.0 when a single digit takes all.
    entropy = float((seen * np.log(1.0 / seen)).sum() / math.log(10))
    return {
        "digit_histogram": [float(h) for h in hist],
        "digit_entropy": entropy,
        "confident_share": float((probs.max(axis=1) >= threshold).mean()),
    }


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    probs = _check_probs(probs)
    return float((probs.argmax(axis=1) == np.asarray(labels)).mean())
