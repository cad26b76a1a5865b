"""EMNIST (Cohen et al. 2017): NIST handwritten digits and letters in MNIST's format.

Its images are stored transposed (column-major), so they are transposed back here; the
``letters`` split stores labels 1..26, shifted to 0..25 (a..z). The balanced splits are
supported (each class the same count, checked). No offline package: a local folder
(``data.path``, with EMNIST's own file names) or torchvision's download (one 562 MB zip)."""

from __future__ import annotations

import string

from bam_vae.datasets.idx import IdxDataset, torchvision_download

_MERGED = set("cijklmopsuvwxyz")  # lowercase letters merged with their uppercase in balanced
BALANCED_CLASSES = tuple(
    c for c in string.digits + string.ascii_uppercase + string.ascii_lowercase if c not in _MERGED
)


def _files(split: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{part}_{kind}", f"emnist-{split}-{part}-{kind}-idx{3 if kind == 'images' else 1}-ubyte")
        for part in ("train", "test")
        for kind in ("images", "labels")
    )


def emnist(split: str, classes: tuple[str, ...], train: int, test: int) -> IdxDataset:
    return IdxDataset(
        name=f"emnist-{split}",
        classes=classes,
        train_counts=(train,) * len(classes),
        test_counts=(test,) * len(classes),
        torchvision=torchvision_download("EMNIST", split=split),
        files=_files(split),
        # Not pinned: no copy was at hand to pin from; torchvision checks its download's MD5.
        sha256=None,
        transposed=True,
        label_offset=1 if split == "letters" else 0,
    )


EMNIST_BALANCED = emnist("balanced", BALANCED_CLASSES, 2400, 400)
EMNIST_LETTERS = emnist("letters", tuple(string.ascii_lowercase), 4800, 800)
EMNIST_DIGITS = emnist("digits", tuple(string.digits), 24000, 4000)
