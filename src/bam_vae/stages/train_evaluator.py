"""Stage ``train-evaluator``: the dataset's classifier behind FID features and class metrics.

Trained in the one training loop (``training/loop.py``) on the dataset's own labels and class
count: interruptible and resumable like ``train``. It has to be a good classifier for its
features and class metrics to mean anything; below the dataset's floor the stage warns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bam_vae import paths
from bam_vae.config import EvaluatorConfig
from bam_vae.datasets import data_sha256, load_info, load_split
from bam_vae.files import save_torch, staged_outputs, write_json
from bam_vae.models import adam, n_parameters, on_device
from bam_vae.scoring.evaluator import Evaluator, as_images, saved_config
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key
from bam_vae.training.loop import Loop, OnBatch, fit, n_batches
from bam_vae.training.runtime import configure_threads, fast_path, resolve_device, seed_everything

# Test accuracy below which the stage warns: MNIST's small CNNs pass 99 %; published small
# CNNs reach ~91-93 % on Fashion-MNIST, ~95 % on KMNIST, ~88-90 % on EMNIST balanced.
MIN_ACCURACY = {"mnist": 0.99, "fashion-mnist": 0.9, "kmnist": 0.93, "emnist-balanced": 0.85,
                "emnist-letters": 0.9, "emnist-digits": 0.99}  # fmt: skip
OTHER_MIN_ACCURACY = 0.8  # the user's own data: a warning only


@torch.no_grad()
def test_metrics(model: Evaluator, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy on ``(x, y)``, in batches of 1 000, in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), 1000):
        logits = model(x[start : start + 1000])
        yb = y[start : start + 1000]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    model.train()
    return {"test_accuracy": correct / len(x), "test_loss": loss / len(x)}


def train_evaluator(
    cfg: EvaluatorConfig,
    data_dir: str | Path,
    model_path: Path = paths.EVALUATOR,
    metrics_path: Path = paths.EVALUATOR_METRICS,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Run the stage: write the classifier and its test metrics; return the metrics.

    SIGINT/SIGTERM leave a checkpoint and the next run with the same config resumes to the
    same weights. ``on_batch(step)`` runs after each step (tests)."""
    device = resolve_device(cfg.device, "evaluator.device")
    configure_threads(cfg.threads)
    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "test")
    dataset = load_info(data_dir)
    if not dataset.labelled:
        return _without_labels(cfg, dataset, model_path, metrics_path)
    key = config_key(cfg.model_dump(), data_sha256(train_images, train_labels, test_images))
    x_train, y_train, x_test, y_test = on_device(
        device, as_images(train_images), train_labels, as_images(test_images), test_labels
    )

    seed_everything(cfg.seed)
    model = Evaluator(cfg.feature_dim, dataset.classes).to(device)
    # Row-major in fp32, as it always was: its weights are the FID feature space, which no
    # speed setting should move, and it trains once per machine, so a faster layout would buy
    # little.
    autocast = fast_path(model, cfg.precision, device, channels_last=False)
    optimizer = adam(model.parameters(), cfg.lr)
    n_steps = cfg.epochs * n_batches(len(x_train), cfg.batch_size)
    # Decaying the rate to zero over the run lets the last epoch settle instead of bouncing.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)

    def step(idx: torch.Tensor, epoch: int) -> dict[str, float]:
        with autocast():
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    ckpt = Checkpoint(checkpoint_path(key, "evaluator"), model, [optimizer, schedule], "evaluator")
    loop = Loop(
        "evaluator", len(x_train), cfg.batch_size, cfg.epochs, step, ckpt, cfg.seed,
        evaluate=lambda: test_metrics(model, x_test, y_test), lr_key=f"evaluator.lr={cfg.lr}",
        callbacks=[OnBatch(on_batch)] if on_batch else [],
    )  # fmt: skip
    model.train()
    state = fit(loop)

    model.cpu().to(memory_format=torch.contiguous_format)
    last = state.history[-1]
    metrics = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "epochs": cfg.epochs,
        "n_parameters": n_parameters(model),
        "dataset": dataset.name,
        "n_classes": dataset.n_classes,
    }
    with staged_outputs() as out:
        blob = {"config": saved_config(cfg, dataset.classes), "state_dict": model.state_dict()}
        save_torch(blob, out.path(model_path))
        write_json(out.path(metrics_path), metrics)
    ckpt.remove()
    _warn_below_floor(metrics["test_accuracy"], dataset.name)
    return metrics


def _warn_below_floor(accuracy: float, name: str) -> None:
    floor = MIN_ACCURACY.get(name, OTHER_MIN_ACCURACY)
    if accuracy < floor:
        print(
            f"evaluator: warning: test accuracy {accuracy:.4f} is below {floor} for {name};"
            " FID features and class metrics from it are unreliable (train longer?)"
        )


def _without_labels(cfg: EvaluatorConfig, dataset, model_path: Path, metrics_path: Path) -> dict:
    """Data without labels has no classifier: the file says so (no weights), and the stages
    that would use it skip its feature space and class metrics, saying why."""
    why = (
        f"dataset {dataset.name} has no labels: no classifier trained, so no classifier FID"
        " space and no class metrics (score it with fid.features=[inception])"
    )
    print(f"evaluator: {why}")
    metrics = {"dataset": dataset.name, "n_classes": 0, "skipped": why}
    with staged_outputs() as out:
        save_torch({"config": saved_config(cfg, ()), "state_dict": {}}, out.path(model_path))
        write_json(out.path(metrics_path), metrics)
    return metrics
