"""Interrupt and resume long loops: signal handling, keyed checkpoints, loop state.

SIGINT/SIGTERM become a flag the loop checks between batches; the loop then saves its
checkpoint and stops. The next run with the same config finds the checkpoint by a key derived
from that config and the data, and continues where it stopped with the same RNG state, so it
ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bam_vae.paths import atomic_path, project_root


def config_key(*parts: Any) -> str:
    """A short, stable digest of JSON-able parts (configs, data digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_path(key: str, kind: str = "train") -> Path:
    # Under the real project root, so checkpoints outlive `dvc exp run --temp` copies.
    return project_root() / ".cache" / "checkpoints" / f"{kind}-{key}.pt"


@dataclass
class State:
    """Where a loop stands: everything besides weights needed to continue it exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed within ``epoch``
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str = ""


def save_checkpoint(path: Path, model: torch.nn.Module, stateful: list, state: State) -> None:
    """``stateful``: optimisers, schedulers -- anything with ``state_dict``."""
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizers": [obj.state_dict() for obj in stateful],
                "rng": torch.get_rng_state(),
                "state": state.__dict__,
            },
            tmp,
        )


def load_checkpoint(path: Path, model: torch.nn.Module, stateful: list) -> State:
    blob = torch.load(path, weights_only=True)
    model.load_state_dict(blob["model"])
    for obj, saved in zip(stateful, blob["optimizers"], strict=True):
        obj.load_state_dict(saved)
    torch.set_rng_state(blob["rng"])
    return State(**blob["state"])


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between batches."""
    caught: list[int] = []
    handler = lambda signum, _frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(caught)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
