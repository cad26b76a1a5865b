"""``data.dataset: npz``: the user's arrays in one ``.npz`` file (``data.path``).

Keys: ``x_train``, ``x_test`` (uint8 pixels, or floats in [0, 1] rounded to the nearest of
256 levels; N x 28 x 28 or N x 1 x 28 x 28), optional ``y_train``, ``y_test`` (integer class
indices 0..K-1; both or neither) and ``classes`` (K names; default "0".."K-1"). Without
labels the data is unlabelled. Read with ``allow_pickle=False``: an object array is refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from bam_vae.config import DataConfig
from bam_vae.datasets.base import SIZE, Prepared, Split, check, user_path
from bam_vae.errors import BamError


def _images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    where = f"{path}: {key}"
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE):
        raise BamError(f"{where} has shape {x.shape}; expected N x 28 x 28 or N x 1 x 28 x 28")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise BamError(f"{where} has dtype {x.dtype}; expected uint8 or floats in [0, 1]")
    if not np.isfinite(x).all():
        raise BamError(f"{where} holds NaN or infinite values; expected floats in [0, 1]")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if low < 0 or high > 1:
        raise BamError(f"{where} has values {low:g}..{high:g}; expected floats in [0, 1]")
    return np.rint(x.astype(np.float64) * 255).astype(np.uint8)


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise BamError(f"{path}: {key} has dtype {y.dtype}; expected integer class indices")
    if y.shape != (n,):
        raise BamError(f"{path}: {key} has shape {y.shape} for {n} images; expected ({n},)")
    return y.astype(np.int64)


def load_npz(cfg: DataConfig, name: str) -> Prepared:
    path = user_path(cfg, folder=False, expected="an .npz with x_train, x_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:  # object arrays need pickle
        raise BamError(
            f"{path}: {exc}; expected plain numeric arrays (no pickled objects)"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BamError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise BamError(f"{path}: no {', '.join(missing)}; found {sorted(arrays) or 'no arrays'}")
    unknown = sorted(set(arrays) - {"x_train", "x_test", "y_train", "y_test", "classes"})
    if unknown:
        raise BamError(f"{path}: unknown arrays {unknown}; expected x_/y_train, x_/y_test, classes")
    if ("y_train" in arrays) != ("y_test" in arrays):
        raise BamError(f"{path}: y_train and y_test go together; found only one of them")
    x_train = _images(arrays["x_train"], path, "x_train")
    x_test = _images(arrays["x_test"], path, "x_test")
    labelled = "y_train" in arrays
    if labelled:
        y_train = _labels(arrays["y_train"], len(x_train), path, "y_train")
        y_test = _labels(arrays["y_test"], len(x_test), path, "y_test")
        n_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        classes = tuple(str(c) for c in range(n_classes))
        if "classes" in arrays:
            names = arrays["classes"]
            if names.ndim != 1 or names.dtype.kind not in "US":
                raise BamError(f"{path}: classes must be a 1-D array of strings, got {names.dtype}")
            classes = tuple(str(c) for c in names.astype(str))
    else:
        y_train, y_test = np.zeros(len(x_train), np.int64), np.zeros(len(x_test), np.int64)
        classes = ()
    data = Prepared(name, classes, Split(x_train, y_train), Split(x_test, y_test),
                    source=f"npz:{path}", labelled=labelled)  # fmt: skip
    check(data)
    return data
