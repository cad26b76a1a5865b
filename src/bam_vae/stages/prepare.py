"""Stage ``prepare-mnist``: the dataset of ``data.dataset`` (MNIST by default) from the first
source that works, checked, as uint8 tensors with its class names."""

from __future__ import annotations

from pathlib import Path

from bam_vae import paths
from bam_vae.config import DataConfig
from bam_vae.datasets import acquire
from bam_vae.datasets.base import save_prepared, split_summary
from bam_vae.files import staged_outputs, write_json


def prepare(cfg: DataConfig, metrics_path: Path = paths.DATA_METRICS) -> dict:
    """Run the stage: write ``{out_dir}/{train,test}.pt``, ``{out_dir}/dataset.json`` and
    ``metrics/data.json``; nothing is written unless the whole dataset passed its checks."""
    data, tried = acquire(cfg)
    out = Path(cfg.out_dir)
    k = len(data.classes)
    summary = {
        "dataset": data.name,
        "classes": list(data.classes),
        "labelled": data.labelled,
        "source": data.source,
        "skipped_sources": tried,
        "train": split_summary(data.train, k),
        "test": split_summary(data.test, k),
        **data.extra,
    }
    with staged_outputs() as staged:
        save_prepared(data, out, staged.path)
        write_json(staged.path(metrics_path), summary)
    print(f"prepare: {data.name} ({k or 'no'} classes) from {data.source} -> {out}")
    return summary
