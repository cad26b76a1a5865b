"""Interrupt and resume long loops: signal handling, keyed checkpoints, loop state.

SIGINT/SIGTERM become a flag the loop checks between batches; the loop then saves its
checkpoint and stops. The next run with the same config finds the checkpoint by a key derived
from that config and the data, and continues where it stopped with the same RNG state, so it
ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bam_vae.errors import Interrupted
from bam_vae.files import exclusive, save_torch
from bam_vae.paths import checkpoint_dir

SAVE_EVERY_S = 30.0  # default bound on the work a SIGKILL loses; BAM_CHECKPOINT_SECONDS sets it


def save_interval() -> float:
    return float(os.environ.get("BAM_CHECKPOINT_SECONDS", SAVE_EVERY_S))


def config_key(*parts: Any) -> str:
    """A short, stable digest of JSON-able parts (configs, data digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_path(key: str, kind: str = "train") -> Path:
    return checkpoint_dir() / f"{kind}-{key}.pt"


@dataclass
class State:
    """Where a loop stands: everything besides weights needed to continue it exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed within ``epoch``
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str = ""
    seconds: float = 0.0  # wall time spent in epoch ``epoch`` so far; a resume adds on


@dataclass
class Checkpoint:
    """The resume file of one loop: where it lives, what it holds, whose it is (messages).

    Saved at every epoch end, on SIGINT/SIGTERM, and every ``SAVE_EVERY_S`` seconds within
    an epoch (``BAM_CHECKPOINT_SECONDS``), so a SIGKILL loses at most that much work."""

    path: Path
    model: torch.nn.Module
    stateful: list  # optimisers, schedulers -- anything with ``state_dict``
    name: str
    last_save: float = field(default_factory=time.monotonic)

    @contextmanager
    def owned(self) -> Iterator[None]:
        """One process per checkpoint: a second run of the same params fails at once instead
        of sharing the checkpoint and the MLflow run."""
        with exclusive(self.path.with_name(f"{self.path.name}.lock"),
                       f"{self.name} checkpoint {self.path}"):  # fmt: skip
            yield

    def resume(self) -> State:
        """The saved state, with model, optimisers and RNG restored; a fresh one if none."""
        self.last_save = time.monotonic()
        if not self.path.is_file():
            return State()
        # Restored if the file turns out unreadable half-way, so starting over starts clean.
        before = copy.deepcopy([self.model.state_dict(), *(o.state_dict() for o in self.stateful)])
        rng = torch.get_rng_state()
        why = "it is truncated or not a complete torch file"
        try:
            blob = torch.load(self.path, weights_only=True)
            why = "it holds the state of another model, optimiser or version of bam-vae"
            self.model.load_state_dict(blob["model"])
            for obj, saved in zip(self.stateful, blob["optimizers"], strict=True):
                obj.load_state_dict(saved)
            torch.set_rng_state(blob["rng"])
            state = State(**blob["state"])
        except Exception:  # truncated, foreign, from an older version: start over
            for obj, saved in zip([self.model, *self.stateful], before, strict=True):
                obj.load_state_dict(saved)
            torch.set_rng_state(rng)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            self.path.replace(aside)
            # Full words, not torch's internals (its zip reader's message is cut mid-sentence).
            print(f"warning: {self.name}: the resume checkpoint {self.path} cannot be used: {why}."
                  f" It is kept as {aside} and {self.name} starts over from the first epoch.",
                  file=sys.stderr)  # fmt: skip
            return State()
        print(f"{self.name}: resuming from {self.path} at epoch {state.epoch + 1},"
              f" batch {state.batch}")  # fmt: skip
        return state

    def save(self, state: State) -> None:
        self.last_save = time.monotonic()
        # Through a buffer: a full disk is then an OSError naming the file (ENOSPC), not
        # torch's "[enforce fail at inline_container.cc] unexpected pos".
        blob = {
            "model": self.model.state_dict(),
            "optimizers": [obj.state_dict() for obj in self.stateful],
            "rng": torch.get_rng_state(),
            "state": state.__dict__,
        }
        save_torch(blob, self.path)

    def interrupted(self, state: State) -> Interrupted:
        """Save, and return the error that stops the loop and says how to go on."""
        self.save(state)
        return Interrupted(
            f"{self.name}: interrupted at epoch {state.epoch + 1}, batch {state.batch};"
            f" checkpoint {self.path} -- run again with the same params to resume"
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def after_batch(self, state: State, stopped: Callable[[], bool], close: Callable) -> None:
        """Per batch: stop with a checkpoint if a signal came (``close`` the progress bar
        first), and save every ``save_interval()`` seconds (what a SIGKILL can cost, since
        no handler runs then)."""
        if stopped():
            close()
            raise self.interrupted(state)
        if time.monotonic() - self.last_save >= save_interval():
            self.save(state)


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between batches.

    Nested uses share the outermost flag: a stage that stops between its loop and its export
    sees a signal that came during the loop."""
    if _caught is not None:
        yield lambda: bool(_caught)
        return
    caught: list[int] = []
    handler = lambda signum, _frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _set_caught(caught)
    try:
        yield lambda: bool(caught)
    finally:
        _set_caught(None)
        for s, h in previous.items():
            signal.signal(s, h)


_caught: list[int] | None = None  # the signals the active ``stop_on_signals`` caught


def _set_caught(caught: list[int] | None) -> None:
    global _caught
    _caught = caught
