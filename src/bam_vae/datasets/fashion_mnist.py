"""Fashion-MNIST (Xiao et al. 2017): Zalando's 70 000 clothing images in MNIST's format.

Offline copy: Debian's package ``dataset-fashion-mnist`` (Expat licence), four IDX ``.gz``
files under ``/usr/share/datasets/fashion-mnist/``: read where the package is installed, else
fetched with ``apt-get download`` into the user cache, checked against the pinned SHA-256 of
the ``.deb`` and unpacked there with ``dpkg-deb -x``. Debian re-gzipped the files, so the
pinned SHA-256 are of the unpacked bytes (equal to upstream's)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bam_vae.config import DataConfig
from bam_vae.datasets.base import SourceUnavailable
from bam_vae.datasets.idx import (
    IdxDataset,
    read_idx_folder,
    torchvision_download,
    verify_sha256,
)
from bam_vae.paths import user_cache

DEB_PACKAGE = "dataset-fashion-mnist"
DEB_VERSION = "0.0~git20200523.55506a9-1"
DEB_FILE = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
DEB_FOLDER = "usr/share/datasets/fashion-mnist"


def fetch_deb(cfg: DataConfig, installed: Path = Path("/") / DEB_FOLDER):
    """The four arrays from the installed package, or from the .deb fetched into the cache."""
    if installed.is_dir():
        try:
            return read_idx_folder(installed)
        except SourceUnavailable:
            pass  # a partial install: fetch the package itself
    cache = user_cache() / "debian"
    unpacked = cache / f"{DEB_PACKAGE}_{DEB_VERSION}" / DEB_FOLDER
    if not unpacked.is_dir():
        deb = cache / DEB_FILE
        if not deb.is_file():
            if shutil.which("apt-get") is None:
                raise SourceUnavailable("apt-get not found (not a Debian-based system)")
            print(f"prepare: fetching {DEB_PACKAGE}={DEB_VERSION} with apt-get download")
            cache.mkdir(parents=True, exist_ok=True)
            timeout = f"Acquire::http::Timeout={int(cfg.download_timeout)}"
            cmd = ["apt-get", "download", "-o", timeout, f"{DEB_PACKAGE}={DEB_VERSION}"]
            done = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
            if done.returncode != 0 or not deb.is_file():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise SourceUnavailable(f"apt-get download {DEB_PACKAGE} failed: {last}")
        verify_sha256(deb, DEB_SHA256, "package")
        staging = cache / f".unpack-{DEB_VERSION}"
        shutil.rmtree(staging, ignore_errors=True)
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise SourceUnavailable(f"dpkg-deb -x {deb} failed: {done.stderr.strip()[:200]}")
        staging.rename(cache / f"{DEB_PACKAGE}_{DEB_VERSION}")  # whole, or not at all
    return read_idx_folder(unpacked)


FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # fmt: skip
    train_counts=(6000,) * 10,
    test_counts=(1000,) * 10,
    torchvision=torchvision_download("FashionMNIST"),
    package=fetch_deb,
    package_name=f"debian:{DEB_PACKAGE}={DEB_VERSION}",
    sha256=(
        ("train_images", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train_labels", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("test_images", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("test_labels", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
)
