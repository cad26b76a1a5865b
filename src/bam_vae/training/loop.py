"""The one training loop: epochs of shuffled mini-batches, resumable, with callbacks.

The VAE (stage ``train``), the evaluator (``train-evaluator``), the VQ-VAE's PixelCNN code
prior and the two-stage sampler (``fit-sampler``) all train here; each brings only its step
(one optimiser update on a batch) and its end-of-epoch evaluation. The loop owns the rest:

- the batch order of each epoch (by default a permutation derived from (seed, epoch), so a
  resumed run sees the same batches as an uninterrupted one);
- running means of the step's floats (per example) and a check that the loss is finite;
- progress (a tqdm bar per epoch, one printed line per epoch);
- SIGINT/SIGTERM: the loop stops after the current batch with a checkpoint, and the next run
  with the same key resumes from it; a checkpoint is also saved every 30 s within an epoch
  (``BAM_CHECKPOINT_SECONDS``) and at every epoch end (``checkpoints.Checkpoint``);
- the history (one row per epoch) and the callbacks (MLflow, test hooks) that receive it,
  with each epoch's wall time (``epoch_seconds``: its steps and evaluation, not the pauses of
  an interrupted run), which stays out of the history so that the history is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from bam_vae.errors import BamError
from bam_vae.training.checkpoints import Checkpoint, State, stop_on_signals
from bam_vae.training.runtime import epoch_order

Step = Callable[[torch.Tensor, int], dict[str, float]]


class Callback:
    """Hooks the loop calls; override what you need."""

    def on_batch_end(self, step: int) -> None:
        """After optimiser step ``step`` (1-based, counted over the whole run)."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """After each epoch's evaluation, with that epoch's history row and its
        ``epoch_seconds`` (float, wall seconds; a resumed epoch counts only its running time)."""


class CosineDecay(Callback):
    """Cosine decay of each optimiser's learning rate, from its initial value at step 0 to 0
    at ``total_steps`` (Loshchilov & Hutter 2017, SGDR without restarts), with torch's
    ``LambdaLR``. Build it before a checkpoint is loaded: ``LambdaLR`` records each group's
    ``initial_lr``, which the optimiser's state then carries, and the rate after step ``s`` is
    set from ``s`` alone, so a resumed run steps with the same rates as an uninterrupted one.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], total_steps: int) -> None:
        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

    def on_batch_end(self, step: int) -> None:
        for scheduler in self.schedulers:
            scheduler.last_epoch = step - 1  # step() counts it on to ``step``
            scheduler.step()


class WeightEMA(Callback):
    """Exponential moving average of a model's weights and buffers, updated after every step
    (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn(decay)``): ``averaged.module`` is
    the model to evaluate, save and sample from. Its ``state_dict`` goes into the checkpoint
    with the optimisers, so a resumed run averages on from where it stopped."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.model = model
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )

    def on_batch_end(self, step: int) -> None:
        self.averaged.update_parameters(self.model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


class OnBatch(Callback):
    """Calls ``fn(step)`` after every optimiser step (tests send signals from here)."""

    def __init__(self, fn: Callable[[int], None]) -> None:
        self.fn = fn

    def on_batch_end(self, step: int) -> None:
        self.fn(step)


def n_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch: the last one holds the remainder."""
    return -(-n_examples // batch_size)


@dataclass
class Loop:
    """What one training run needs besides its model.

    ``step(indices, epoch)`` runs one update on the examples at ``indices`` (int64, on the
    CPU) of epoch ``epoch`` (0-based) and returns floats to average, ``loss`` among them.
    ``evaluate()`` returns the end-of-epoch metrics (e.g. test losses). ``order(epoch)`` is
    the permutation of the ``n_examples`` examples for that epoch.
    """

    name: str  # in progress bars and messages: "train", "evaluator", "pixelcnn"...
    n_examples: int
    batch_size: int
    epochs: int
    step: Step
    checkpoint: Checkpoint
    seed: int = 0
    evaluate: Callable[[], dict[str, float]] = dict
    order: Callable[[int], torch.Tensor] | None = None
    lr_key: str = "train.lr"  # named when the loss is not finite
    callbacks: Sequence[Callback] = field(default_factory=list)

    @property
    def n_batches(self) -> int:
        return n_batches(self.n_examples, self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self.order is not None:
            return self.order(epoch)
        return epoch_order(self.n_examples, self.seed, epoch)


def accumulate(sums: dict[str, float], floats: dict[str, float], n: int) -> None:
    for k, v in floats.items():
        sums[k] = sums.get(k, 0.0) + v * n


def describe(name: str, epochs: int, row: dict[str, float]) -> str:
    """One line per epoch: ``train epoch 3/10: train_loss 27.1, test_loss 26.87, ...``."""
    values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
    return f"{name} epoch {int(row['epoch'])}/{epochs}: {values}"


def fit(loop: Loop, state: State | None = None) -> State:
    """Run ``loop`` from ``state`` (by default what its checkpoint holds) to its last epoch.

    Returns the final state, whose ``history`` has one row per epoch: ``epoch``, the means of
    the step's floats as ``train_<name>``, and ``evaluate()``'s metrics. Raises
    :class:`~bam_vae.errors.Interrupted` (checkpoint saved) on SIGINT/SIGTERM and
    :class:`~bam_vae.errors.BamError` on a non-finite loss."""
    ckpt, n_batches = loop.checkpoint, loop.n_batches
    state = ckpt.resume() if state is None else state
    with stop_on_signals() as stopped:
        for epoch in range(state.epoch, loop.epochs):
            order = loop.epoch_order(epoch)
            started = time.monotonic() - state.seconds
            bar = tqdm(total=n_batches, initial=state.batch, unit="batch", leave=False,
                       desc=f"{loop.name} epoch {epoch + 1}/{loop.epochs}",
                       dynamic_ncols=True, mininterval=1.0)  # fmt: skip
            for b in range(state.batch, n_batches):
                idx = order[b * loop.batch_size : (b + 1) * loop.batch_size]
                floats = loop.step(idx, epoch)
                if not math.isfinite(floats["loss"]):
                    raise BamError(
                        f"{loop.name}: loss is {floats['loss']} at epoch {epoch + 1}, batch"
                        f" {b + 1}; expected a finite loss (lower {loop.lr_key}?)"
                    )
                accumulate(state.sums, floats, len(idx))
                state.seen += len(idx)
                state.batch = b + 1
                state.seconds = time.monotonic() - started
                bar.set_postfix(loss=f"{state.sums['loss'] / state.seen:.4g}", refresh=False)
                bar.update()
                for callback in loop.callbacks:
                    callback.on_batch_end(epoch * n_batches + b + 1)
                ckpt.after_batch(state, stopped, bar.close)
            bar.close()
            row = {"epoch": epoch + 1}
            row |= {f"train_{k}": v / max(1, state.seen) for k, v in state.sums.items()}
            row |= loop.evaluate()
            state.history.append(row)
            timed = row | {"epoch_seconds": time.monotonic() - started}
            for callback in loop.callbacks:
                callback.on_epoch_end(timed)
            print(describe(loop.name, loop.epochs, row))
            state.epoch, state.batch, state.seen, state.sums = epoch + 1, 0, 0, {}
            state.seconds = 0.0
            ckpt.save(state)
    return state
