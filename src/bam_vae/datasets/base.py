"""What every dataset becomes: two splits of uint8 28 x 28 images with int64 labels and class
names, checked once here (stage ``prepare-mnist``) so that every later stage is
dataset-agnostic; and loading the prepared files back.

Prepared folder (``data.out_dir``): ``train.pt``, ``test.pt`` (``{"images": uint8 N x 28 x 28,
"labels": int64 N}``, plain tensors) and ``dataset.json`` (name, class names, whether the
labels are real). A folder written before ``dataset.json`` existed is MNIST's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bam_vae.errors import BamError
from bam_vae.files import load_tensors, save_torch, write_json

SIZE = 28  # every model here is built for 1 x 28 x 28 images
MNIST_CLASSES = tuple(str(d) for d in range(10))
INFO_FILE = "dataset.json"


class SourceUnavailable(Exception):
    """This source cannot be used here (absent folder, no network); try the next one."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x 28 x 28
    labels: np.ndarray  # int64, N (all 0 for data without labels)


@dataclass(frozen=True)
class Prepared:
    """A dataset as it enters the pipeline. ``labelled`` is False for images without classes
    (then ``classes`` is empty and the labels are all 0). ``extra`` goes to data.json."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    source: str
    labelled: bool = True
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """``dataset.json`` of a prepared folder: what later stages need to know of the data."""

    name: str
    classes: tuple[str, ...]
    labelled: bool = True

    @property
    def n_classes(self) -> int:
        """Classes a conditional model or the evaluator sees (1 for data without labels)."""
        return max(len(self.classes), 1)


def check(data: Prepared, counts: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
    """Shapes, dtype, label range, no empty split or class; ``counts`` (train, test) the
    per-class counts a named dataset must have. Raises BamError naming the split and source."""
    k = len(data.classes)
    for i, (name, split) in enumerate((("train", data.train), ("test", data.test))):
        where = f"{data.name} {name} split from {data.source}"
        n = len(split.images)
        if n == 0:
            raise BamError(f"{where}: no images; expected at least one in each split")
        if split.images.shape != (n, SIZE, SIZE) or split.images.dtype != np.uint8:
            raise BamError(
                f"{where}: images {split.images.shape} {split.images.dtype},"
                f" expected (N, {SIZE}, {SIZE}) uint8"
            )
        if split.labels.shape != (n,):
            raise BamError(f"{where}: {len(split.labels)} labels for {n} images; expected one each")
        if not data.labelled:
            continue
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= k:
            raise BamError(
                f"{where}: labels {low}..{high} out of range; expected 0..{k - 1} ({k} classes)"
            )
        found = tuple(int(c) for c in np.bincount(split.labels, minlength=k))
        if counts is not None and found != counts[i]:
            raise BamError(f"{where}: class counts {found}, expected {counts[i]}")
        if name == "train" and 0 in found:
            empty = data.classes[found.index(0)]
            raise BamError(f"{where}: class {empty!r} has no images; expected every class used")


def user_path(cfg, folder: bool, expected: str) -> Path:
    """``data.path`` checked to be a folder (``folder``) or a file; else one line."""
    path = Path(cfg.path)
    kind = "folder" if folder else "file"
    if not path.exists():
        raise BamError(f"data.path {path}: no such {kind}; expected {expected}")
    if path.is_dir() != folder:
        found = "a folder" if path.is_dir() else "a file"
        raise BamError(f"data.path {path}: {found}, not a {kind}; expected {expected}")
    return path


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def split_summary(split: Split, n_classes: int) -> dict:
    """Counts and digests of a split (``n_classes`` 0: data without labels, no class counts)."""
    counts = np.bincount(split.labels, minlength=n_classes) if n_classes else []
    return {
        "count": int(len(split.labels)),
        "class_counts": [int(c) for c in counts],
        "sha256_images": sha256(split.images),
        "sha256_labels": sha256(split.labels),
    }


def save_prepared(data: Prepared, out_dir: Path, path_of) -> None:
    """Write the splits and ``dataset.json``; ``path_of`` maps a final path to where it is
    staged (``files.staged_outputs``)."""
    for name, split in (("train", data.train), ("test", data.test)):
        blob = {"images": torch.from_numpy(split.images.copy()),
                "labels": torch.from_numpy(split.labels.astype(np.int64))}  # fmt: skip
        save_torch(blob, path_of(out_dir / f"{name}.pt"))
    info = {"name": data.name, "classes": list(data.classes), "labelled": data.labelled}
    write_json(path_of(out_dir / INFO_FILE), info)


# ---------------------------------------------------------------------------- loading back
def load_info(out_dir: str | Path) -> DatasetInfo:
    """The prepared dataset's name and classes (MNIST's for a folder without dataset.json)."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        return DatasetInfo("mnist", MNIST_CLASSES)
    hint = "run `bam prepare` (or `dvc repro prepare-mnist`) to rewrite it"
    try:
        raw = json.loads(path.read_text())
        info = DatasetInfo(str(raw["name"]), tuple(map(str, raw["classes"])), bool(raw["labelled"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BamError(f"corrupt dataset file {path}: {exc}; {hint}") from None
    return info


def load_split(out_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared split as (uint8 N x 28 x 28 images, int64 labels); fails clearly if absent."""
    path = Path(out_dir) / f"{name}.pt"
    if not path.is_file():
        raise BamError(f"prepared data file {path} not found; run `bam prepare` (or `dvc repro`)")
    hint = "run `bam prepare` (or `dvc repro prepare-mnist`) to rewrite it"
    blob = load_tensors(path, "prepared data", hint)
    blob = blob if isinstance(blob, dict) else {}
    images, labels = blob.get("images"), blob.get("labels")
    ok = (
        isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8 and images.ndim == 3 and images.shape[1:] == (SIZE, SIZE)
        and labels.dtype == torch.int64 and labels.shape == images.shape[:1] and len(labels) > 0
    )  # fmt: skip
    if not ok:
        got = {k: (getattr(v, "dtype", type(v).__name__), tuple(getattr(v, "shape", ())))
               for k, v in (("images", images), ("labels", labels))}  # fmt: skip
        raise BamError(
            f"corrupt prepared data file {path}: got {got}, expected uint8 images (N, 28, 28)"
            f" and int64 labels (N,), N > 0; {hint}"
        )
    return images, labels


def data_sha256(*tensors: torch.Tensor) -> str:
    """One digest of the arrays a run saw, used to tag its MLflow run."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reconstruction_set(data_dir: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test images of each class, classes in order (at most 10
    classes, so the figure stays readable; data without labels: the first 10 x per_class)."""
    images, labels = load_split(data_dir, "test")
    info = load_info(data_dir)
    if not info.labelled:
        idx = torch.arange(min(len(images), 10 * per_class))
    else:
        shown = range(min(info.n_classes, 10))
        idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in shown])
    return images[idx].float().div(255.0).unsqueeze(1), labels[idx]
