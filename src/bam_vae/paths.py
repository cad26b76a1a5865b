"""Where things live: the project root, per-machine caches, atomic writes, saved models."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bam_vae.errors import BamError


def project_root() -> Path:
    """The real project root, also inside ``dvc exp run --temp`` copies.

    DVC sets ``DVC_ROOT`` to the real repository while a stage runs in a temporary copy,
    so anything that must outlive the copy (the MLflow store, resume checkpoints) goes there.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / ".dvc").is_dir():
            return folder
    return here


def user_cache() -> Path:
    """Per-machine cache shared by every checkout, the tests and CI (fetch once)."""
    base = (
        os.environ.get("BAM_VAE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bam-vae"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it over ``path`` only on success.

    A failed or interrupted write never leaves a half-written file or destroys the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; outputs are ordinary files other users and tools may read.
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a buffer: the file's bytes do not depend on its temporary name,
    so the same weights give the same file (and the same DVC hash) on every run."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_saved_model(
    path: str | Path, kind: str, hint: str, build: Callable[[dict], torch.nn.Module]
) -> tuple[Any, dict]:
    """A model saved as ``{"config", "state_dict"}`` (plain tensors, so ``weights_only``),
    rebuilt by ``build(config)`` on the CPU in eval mode; returns (model, config).

    A missing or corrupt file is a one-line error naming it, with ``hint`` on how to remake it.
    """
    path = Path(path)
    if not path.is_file():
        raise BamError(f"{kind} file {path} not found; {hint}")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
        model = build(blob["config"])
        model.load_state_dict(blob["state_dict"])
    except BamError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BamError(f"corrupt {kind} file {path}: {reason}; {hint}") from None
    return model.eval(), blob["config"]
