"""Files written safely: atomic writes, all-or-nothing staged outputs, locks, and loading
saved tensors and models without unpickling anything."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bam_vae.errors import BamError, reason


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
    except OSError as exc:
        # A failed write(2) (a full disk) names no file: name the one being written.
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


# Checks a stage registers to run before it writes anything for good (its outputs moved
# into place, a model version registered): see bam_vae.stage_inputs.
_commit_checks: list[Callable[[], None]] = []


@contextmanager
def commit_check(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check`` (it raises to refuse) before every commit while the block runs."""
    _commit_checks.append(check)
    try:
        yield
    finally:
        _commit_checks.remove(check)


def before_commit() -> None:
    """Every registered commit check; called before outputs or registrations become final."""
    for check in list(_commit_checks):
        check()


class StagedOutputs:
    """A stage's outputs, written aside and moved into place together at the end.

    ``path(final)`` gives a file of the same name in a hidden staging folder beside
    ``final`` (same filesystem, and MLflow logs it under its real name). Nothing reaches
    ``final`` until :meth:`commit`, so a stage that fails or is stopped at any point -- bad
    input, an unreachable server, a signal -- leaves every earlier output as it was.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}
        self._removed: list[Path] = []
        self._dirs: list[Path] = []

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if final in self._staged:
            return self._staged[final]
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=final.parent, prefix=".staging-"))
        self._dirs.append(folder)
        self._staged[final] = folder / final.name
        return self._staged[final]

    def remove(self, final: str | Path) -> None:
        """Delete ``final`` at commit time (an output this run does not produce)."""
        self._removed.append(Path(final))

    def commit(self) -> None:
        before_commit()
        umask = os.umask(0)
        os.umask(umask)
        for final, tmp in self._staged.items():
            if not tmp.exists():
                raise BamError(f"internal: staged output {final} was never written")
        for final, tmp in self._staged.items():
            tmp.chmod(0o666 & ~umask)  # mkstemp/mkdtemp modes are private
            os.replace(tmp, final)
        for final in self._removed:
            final.unlink(missing_ok=True)

    def discard(self) -> None:
        for folder in self._dirs:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """``with staged_outputs() as out: ... out.path(final) ...``: all or nothing."""
    staged = StagedOutputs()
    try:
        yield staged
        staged.commit()
    finally:
        staged.discard()


@contextmanager
def exclusive(lock_file: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold ``lock_file`` for this process, or fail at once naming the process that holds it
    (``wait``: say so and wait for it instead).

    An OS lock (``flock``): it dies with its process, so a crash or SIGKILL never leaves a
    stale lock behind. The file is removed on release; whoever locked a file that was removed
    meanwhile tries again on the new one."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                os.close(fd)
                message = f"{what} is in use by {holder}; wait for it to finish or stop it"
                raise BamError(message) from None
            print(f"{what} is being written by {holder}; waiting for it", flush=True)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
            except BaseException:
                os.close(fd)
                raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv[:2]))
        holder = f"pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})"
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, holder.encode(), 0)
        except OSError as exc:  # a full disk: name the lock file, as any other write
            exc.filename = str(lock_file)
            raise
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # while still held, so nobody locks a stale file
        os.close(fd)


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


def _names(items: list[str]) -> str:
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return ", ".join(items[:3]) + more


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(str(n) for n in tensor.shape) or "scalar"


def load_tensors(path: str | Path, kind: str, hint: str) -> Any:
    """``torch.load`` of a file of plain tensors and containers, never unpickling objects.

    Any problem is one line naming the file and, with ``hint``, how to remake it -- never
    torch's own multi-line text nor its advice to unpickle the file anyway."""
    path = Path(path)
    if not path.is_file():
        raise BamError(f"{kind} file {path} not found; {hint}")
    try:
        with path.open("rb") as file:
            empty = not file.read(1)
    except OSError as exc:  # unreadable here; what torch.load raises is about the content
        raise BamError(f"cannot read {kind} file {path}: {exc.strerror or exc}; {hint}") from None
    if empty:
        raise BamError(f"corrupt {kind} file {path}: the file is empty; {hint}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise, not news
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found or "allowlist" in str(exc):
            what = f"a pickled {found.group(1)}" if found else "pickled objects"
            raise BamError(
                f"{kind} file {path} is not a plain-tensor file (it holds {what}, and loading"
                f" it would need unpickling arbitrary objects, which bam-vae never does); {hint}"
            ) from None
        why = "not a torch file (unreadable pickle data)"
    except Exception:  # torch's zip reader: RuntimeError, OSError (EINVAL), EOFError...
        why = "not a complete torch file (truncated, or another format)"
    raise BamError(f"corrupt {kind} file {path}: {why}; {hint}")


def load_saved_model(
    path: str | Path,
    kind: str,
    hint: str,
    build: Callable[[dict], torch.nn.Module],
    upgrade: Callable[[dict, dict], None] | None = None,
) -> tuple[Any, dict]:
    """A model saved as ``{"config", "state_dict"}`` (plain tensors, so ``weights_only``),
    rebuilt by ``build(config)`` on the CPU in eval mode; returns (model, config).
    ``upgrade(config, state_dict)``, if given, first brings a file written by an earlier
    version of bam-vae up to date, in place.

    A missing or corrupt file is a one-line error naming it, with ``hint`` on how to remake it:
    never torch's or pydantic's own multi-line text.
    """
    from pydantic import ValidationError

    from bam_vae.config import describe_validation_error

    blob = load_tensors(path, kind, hint)

    def corrupt(why: str) -> BamError:
        return BamError(f"corrupt {kind} file {path}: {' '.join(why.split())}; {hint}")

    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        found = f"a {type(blob).__name__}"
        if isinstance(blob, dict):
            found = f"keys {_names([str(k) for k in blob])}" if blob else "no keys"
        raise corrupt(f"expected the keys config and state_dict, found {found}")
    config, saved = blob["config"], blob["state_dict"]
    if not isinstance(config, dict) or not isinstance(saved, dict):
        raise corrupt("its config and state_dict must both be dictionaries")
    if upgrade is not None:
        upgrade(config, saved)
    try:
        model = build(config)
    except ValidationError as exc:
        why = describe_validation_error(exc, "its config")
        raise corrupt(f"its config is not valid ({why})") from None
    except BamError as exc:
        raise corrupt(f"its config is not valid ({exc})") from None
    except Exception as exc:
        raise corrupt(f"cannot build a model from its config ({reason(exc)})") from None

    # Compare names and shapes first: load_state_dict's own error is many lines of internals.
    built = model.state_dict()
    missing = [k for k in built if k not in saved]
    unexpected = [str(k) for k in saved if k not in built]
    not_tensors = [k for k in built if k in saved and not isinstance(saved[k], torch.Tensor)]
    shapes = [
        f"{k}: saved {_dims(saved[k])} vs built {_dims(built[k])}"
        for k in built
        if k in saved and k not in not_tensors and saved[k].shape != built[k].shape
    ]
    problems = [
        f"{label}{_names(items)}"
        for label, items in (
            ("missing keys: ", missing),
            ("unexpected keys: ", unexpected),
            ("not tensors: ", not_tensors),
            ("shape mismatch for ", shapes),
        )
        if items
    ]
    if problems:
        raise corrupt(f"its weights do not match its config ({'; '.join(problems)})")
    try:
        model.load_state_dict(saved)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Error(s) in loading")]
        raise corrupt(f"its weights cannot be loaded ({lines[0] if lines else exc})") from None
    return model.eval(), config


def save_model(model: torch.nn.Module, cfg: Any, path: Path) -> None:
    """A VAE and its ``ModelConfig`` as ``{"config", "state_dict"}``: plain tensors. A
    conditional model's config also holds its ``n_classes`` (the dataset's)."""
    save_torch({"config": model_config(model, cfg), "state_dict": model.state_dict()}, path)


def model_config(model: Any, cfg: Any) -> dict:
    """``cfg`` as saved with ``model``: plus ``n_classes`` for a conditional model."""
    extra = {"n_classes": model.n_classes} if model.conditional else {}
    return cfg.model_dump() | extra


def build_saved(config: dict) -> Any:
    """The VAE a saved config describes (``n_classes`` absent: MNIST's 10)."""
    from bam_vae.config import ModelConfig
    from bam_vae.models import build_model

    rest = {k: v for k, v in config.items() if k != "n_classes"}
    return build_model(ModelConfig.model_validate(rest), int(config.get("n_classes", 10)))


def load_model(path: str | Path) -> tuple[Any, Any]:
    """(VAE in eval mode on the CPU, ``ModelConfig``) from ``models/vae.pt`` (plain tensors +
    config: safe with ``weights_only=True``)."""
    from bam_vae.config import ModelConfig

    hint = "run `bam train` (or `dvc repro`)"
    model, config = load_saved_model(path, "model", hint, build_saved, _upgrade_model)
    config.pop("n_classes", None)
    return model, ModelConfig.model_validate(config)


# The VQ-VAE's PixelCNN prior was part of the model until it became sampler ``pixelcnn``.
_MOVED_VQ_KEYS = ("prior_epochs", "prior_channels", "prior_layers", "prior_lr")


def _upgrade_model(config: dict, state_dict: dict) -> None:
    """Models saved before the PixelCNN prior moved out of the VQ-VAE: its params left
    ``model.vq`` (every arch saved them) and its weights the state dict (a VQ-VAE's own
    weights are unchanged; fit ``pixelcnn`` with ``bam fit-sampler`` to sample from it)."""
    vq = config.get("vq")
    if isinstance(vq, dict):
        for key in _MOVED_VQ_KEYS:
            vq.pop(key, None)
    for key in [k for k in state_dict if isinstance(k, str) and k.startswith("prior.")]:
        del state_dict[key]
