"""Dataset registry: ``data.dataset`` -> the code that reads it. A new named dataset in IDX
format is one :class:`~bam_vae.datasets.idx.IdxDataset` entry (classes, counts, SHA-256,
sources); a new format is one module with a ``load(cfg, name) -> Prepared`` function.

Every entry gives a :class:`~bam_vae.datasets.base.Prepared`: checked uint8 28 x 28 images,
int64 labels and class names. Later stages read it back with ``load_split``/``load_info``.
"""

from __future__ import annotations

import re
from pathlib import Path

from bam_vae.config import USER_FORMATS, DataConfig
from bam_vae.datasets.base import (
    DatasetInfo,
    Prepared,
    data_sha256,
    load_info,
    load_split,
    reconstruction_set,
    sha256,
)
from bam_vae.errors import BamError

__all__ = [
    "DatasetInfo", "Prepared", "acquire", "data_sha256", "dataset_name", "load_info", "sha256",
    "load_split", "reconstruction_set",
]  # fmt: skip

# data.dataset -> (module, attribute): imported on use, so a user format costs no PIL import
NAMED = {
    "mnist": ("mnist", "MNIST"),
    "fashion-mnist": ("fashion_mnist", "FASHION_MNIST"),
    "kmnist": ("kmnist", "KMNIST"),
    "emnist-balanced": ("emnist", "EMNIST_BALANCED"),
    "emnist-letters": ("emnist", "EMNIST_LETTERS"),
    "emnist-digits": ("emnist", "EMNIST_DIGITS"),
}
USER = {"idx": ("idx", "load_user_idx"), "npz": ("npz", "load_npz"),
        "images": ("images", "load_images")}  # fmt: skip


def _attr(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"bam_vae.datasets.{module}"), name)


def dataset_name(cfg: DataConfig) -> str:
    """The name runs and registered models carry: the named dataset, or for the user's own
    data ``data.name`` (default: the file or folder name, lowercased, other characters -)."""
    if cfg.dataset not in USER_FORMATS:
        return cfg.dataset
    stem = re.sub(r"[^a-z0-9]+", "-", Path(cfg.path).resolve().stem.lower()).strip("-")
    return cfg.name or stem or cfg.dataset


def acquire(cfg: DataConfig) -> tuple[Prepared, list[str]]:
    """The checked dataset of ``cfg`` and the sources skipped on the way (named datasets)."""
    if cfg.dataset in USER:
        name = dataset_name(cfg)
        if name in NAMED:  # its runs and registered models would mix with the real one's
            raise BamError(
                f"data.name: {name!r} (from {'data.name' if cfg.name else 'data.path'}) is the"
                f" name of the named dataset {name}; expected another name for your own data"
                " (set data.name)"
            )
        return _attr(*USER[cfg.dataset])(cfg, name), []
    return _attr(*NAMED[cfg.dataset]).load(cfg)
