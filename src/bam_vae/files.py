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

from bam_vae.errors import BamError


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
