"""Kuzushiji-MNIST (Clanuwat et al. 2018): ten cursive hiragana, 6 000 / 1 000 per class.
No offline package: a local folder (``data.path``) or torchvision's download."""

from __future__ import annotations

from bam_vae.datasets.idx import IdxDataset, torchvision_download

KMNIST = IdxDataset(
    name="kmnist",
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    train_counts=(6000,) * 10,
    test_counts=(1000,) * 10,
    torchvision=torchvision_download("KMNIST"),
    # Not pinned: no copy was at hand to pin from; torchvision checks its download's MD5.
    sha256=None,
)
