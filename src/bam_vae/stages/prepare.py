"""Stage ``prepare-mnist``: real MNIST from the first source that works, as uint8 tensors."""

from __future__ import annotations

from pathlib import Path

from bam_vae import paths
from bam_vae.config import DataConfig
from bam_vae.data import acquire, console, save_split, split_summary
from bam_vae.files import staged_outputs, write_json


def prepare(cfg: DataConfig, metrics_path: Path = paths.DATA_METRICS) -> dict:
    """Run the stage: write ``{out_dir}/{train,test}.pt`` and ``metrics/data.json``."""
    mnist, tried = acquire(cfg)
    out = Path(cfg.out_dir)
    summary = {
        "source": mnist.source,
        "skipped_sources": tried,
        "train": split_summary(mnist.train),
        "test": split_summary(mnist.test),
    }
    with staged_outputs() as staged:
        save_split(mnist.train, staged.path(out / "train.pt"))
        save_split(mnist.test, staged.path(out / "test.pt"))
        write_json(staged.path(metrics_path), summary)
    console.print(f"prepare: MNIST from {mnist.source} -> {out}")
    return summary
