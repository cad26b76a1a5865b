"""What the SIGKILL bound costs: one resume-checkpoint save against one training step.

Training saves its checkpoint every ``BAM_CHECKPOINT_SECONDS`` (30 s) within an epoch, so a
SIGKILL loses at most that much work; this prints the save time and its share of the run.

    python bench/checkpoint_save.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bam_vae.config import load_params
from bam_vae.models import build_model
from bam_vae.training.checkpoints import Checkpoint, State, save_interval
from bam_vae.training.runtime import configure_threads


def mean_seconds(fn, repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    params = load_params("params.yaml")
    print(f"torch threads: {configure_threads(params.train.threads)}")
    x = torch.rand(params.train.batch_size, 1, 28, 28)
    y = torch.zeros(len(x), dtype=torch.int64)
    for arch in ("dense", "cnn"):
        save, step, size = measure(build_model(params.model.model_copy(update={"arch": arch})),
                                   params, x, y)  # fmt: skip
        print(f"{arch}: save {save * 1e3:.1f} ms ({size:.1f} MB) = {save / step:.2f} training"
              f" steps; every {save_interval():.0f} s that is {100 * save / save_interval():.3f} %"
              " of the time")  # fmt: skip


def measure(model, params, x, y) -> tuple[float, float, float]:
    """(seconds per save, seconds per training step, checkpoint MB)."""
    optimizers = model.configure_optimizers(params.train)
    step = mean_seconds(lambda: model.train_step(x, y, optimizers, params.train, 0))
    with tempfile.TemporaryDirectory() as tmp:  # optimiser state exists, as in a real one
        ckpt = Checkpoint(Path(tmp) / "train.pt", model, optimizers, "bench")
        state = State(history=[{"test_loss": 1.0}] * params.train.epochs)
        save = mean_seconds(lambda: ckpt.save(state))
        return save, step, ckpt.path.stat().st_size / 1e6


if __name__ == "__main__":
    main()
