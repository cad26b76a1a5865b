"""Stage ``train``: fit a VAE on prepared MNIST, track it in MLflow, register its generator.

Batches are sliced from one in-memory float tensor (no per-sample PIL or ``ToTensor``).
SIGINT/SIGTERM stop after the current batch and leave a checkpoint (``checkpoints.py``); the
next run with the same params resumes from it and ends with the same weights as an
uninterrupted run (the shuffling is derived from (seed, epoch); RNG and optimiser state are
saved).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch
from tqdm import tqdm

from bam_vae import tracking
from bam_vae.checkpoints import Checkpoint, checkpoint_path, config_key, stop_on_signals
from bam_vae.config import Params, TrainConfig
from bam_vae.data import data_sha256, load_split
from bam_vae.errors import BamError, Interrupted
from bam_vae.models import build_model, n_parameters, on_device, save_model
from bam_vae.paths import staged_outputs, write_json

MODEL_PATH = Path("models/vae.pt")
METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/train_history.csv")
EVAL_SEED = 12345  # fixed posterior noise for test losses, so epochs compare like with like


# ---------------------------------------------------------------------------- machine setup
def resolve_device(name: str, key: str = "train.device") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BamError(f"{key}: 'cuda' requested but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name: speeds (and bf16's gain) differ between the machines a
    sweep or CI lands on, so runs and benchmarks record it."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def configure_threads(requested: int) -> int:
    """Torch threads: the param if set, else cores / parallel workers (``BAM_PARALLEL_JOBS``).

    Two torch processes that each take every core run many times slower than one alone, so
    queue workers must split the machine between them. Also keeps freed memory in the process
    (:func:`retain_freed_memory`): every stage that computes calls this first.
    """
    retain_freed_memory()
    jobs = max(1, int(os.environ.get("BAM_PARALLEL_JOBS", "1")))
    threads = requested or max(1, available_cores() // jobs)
    torch.set_num_threads(threads)
    return threads


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")


def retain_freed_memory() -> bool:
    """Keep memory that torch frees in this process instead of handing it back to the kernel.

    glibc's malloc returns blocks of more than a few MB to the kernel (mmap, heap trimming),
    and each step then faults its activations in again, page by zeroed page: 2 000-6 000 page
    faults per step of the default CNN. Without them the CNN's fp32 step is 1.1-1.25x and the
    Inception features 1.35x faster here (README, Speed). jemalloc and tcmalloc, which
    PyTorch's CPU tuning guide recommends, keep freed memory by default too. Only glibc; a
    user's own malloc settings or preloaded allocator win. The process keeps its peak memory
    until it exits (stages are short-lived processes)."""
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _USER_MALLOC_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    )


def fast_path(
    model: torch.nn.Module, precision: str, device: torch.device, channels_last: bool = True
):
    """Channels-last convolutions (oneDNN's fastest layout: 1.27x in fp32, more in bf16), and
    an autocast context for the training steps, on for ``bf16``.

    Only the steps run under autocast (evaluation, sampling and scoring stay fp32). Backward
    runs inside it too: checked to give bit-identical gradients to a backward outside.
    """
    if channels_last or precision == "bf16":
        model.to(memory_format=torch.channels_last)
    return lambda: torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------- data
def training_images(
    cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] and their labels, subset to ``train_fraction``, with noise on
    ``noise_fraction`` of the images.

    Both choices are drawn from their own generator seeded by ``seed`` so they do not depend
    on anything else in the run.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    x = images.float().div_(255.0).unsqueeze(1)
    if cfg.train_fraction < 1.0:
        keep = max(1, round(cfg.train_fraction * len(x)))
        idx = torch.randperm(len(x), generator=gen)[:keep].sort().values
        x, labels = x[idx], labels[idx]
    if cfg.noise_fraction > 0 and cfg.noise_std > 0:
        n_noisy = round(cfg.noise_fraction * len(x))
        idx = torch.randperm(len(x), generator=gen)[:n_noisy]
        noise = torch.randn((n_noisy, *x.shape[1:]), generator=gen) * cfg.noise_std
        x[idx] = (x[idx] + noise).clamp_(0.0, 1.0)
    return x, labels


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# ---------------------------------------------------------------------------- checkpoints
def run_key(params: Params, data_digest: str) -> str:
    return config_key(params.model.model_dump(), params.train.model_dump(), data_digest)


# ---------------------------------------------------------------------------- loop
def accumulate(sums: dict[str, float], parts: dict[str, float], n: int) -> None:
    for k, v in parts.items():
        sums[k] = sums.get(k, 0.0) + v * n


@torch.no_grad()
def evaluate(model, x, y, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    model.eval()
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    sums: dict[str, float] = {}
    for start in range(0, len(x), 1000):
        xb, yb = x[start : start + 1000], y[start : start + 1000]
        accumulate(sums, model.loss(model(xb, yb, generator=gen), xb, cfg).as_floats(), len(xb))
    model.train()
    return {k: v / len(x) for k, v in sums.items()}


def fit(
    params: Params,
    model_path: Path = MODEL_PATH,
    metrics_path: Path = METRICS_PATH,
    history_path: Path = HISTORY_PATH,
    run_ref_path: Path = tracking.RUN_REF,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Run the stage. ``on_batch(step)`` is called after each optimiser step (tests use it).

    All or nothing: the outputs are written aside and moved into place only after the model
    is logged and registered, so a failure or a signal at any point leaves the previous
    outputs as they were, the MLflow run KILLED (or FAILED) and a checkpoint to resume."""
    cfg = params.train
    tracking.init()  # an unreachable tracking server fails here, before any work
    device = resolve_device(cfg.device)
    threads = configure_threads(cfg.threads)
    train_images, train_labels = load_split(params.data.out_dir, "train")
    test_images, test_labels = load_split(params.data.out_dir, "test")
    digest = data_sha256(train_images, test_images)

    seed_everything(cfg.seed)
    x_train, y_train = training_images(cfg, train_images, train_labels)
    x_test = test_images.float().div_(255.0).unsqueeze(1)
    # Moved once: batches are sliced on the device, no per-batch host copies.
    x_train, y_train, x_test, y_test = on_device(device, x_train, y_train, x_test, test_labels)
    model = build_model(params.model).to(device)
    autocast = fast_path(model, cfg.precision, device)
    optimizers = model.configure_optimizers(cfg)

    key = run_key(params, digest)
    ckpt = Checkpoint(checkpoint_path(key), model, optimizers, "train")
    with ckpt.owned():
        state = ckpt.resume()
        if state.run_id and not tracking.run_exists(state.run_id):
            print(f"train: the checkpoint's MLflow run {state.run_id} is gone; logging a new run")
            state.run_id = ""
        tracking.settle_orphans(key, keep=state.run_id)
        # System metrics (CPU, memory; GPU with pynvml) are sampled while the run is open.
        with mlflow.start_run(run_id=state.run_id or None, log_system_metrics=True) as run:
            if not state.run_id:
                state.run_id = run.info.run_id
                splits = {"train": (train_images, train_labels, "training"),
                          "test": (test_images, test_labels, "evaluation")}  # fmt: skip
                for split, (images, labels, context) in splits.items():
                    path = Path(params.data.out_dir) / f"{split}.pt"
                    sha = data_sha256(images, labels)
                    tracking.log_dataset(path, sha, context, len(images))
                mlflow.log_params(tracking.flat_params(params.model_dump(mode="json")))
                mlflow.log_params({"n_parameters": n_parameters(model),
                                   "n_train_images": len(x_train), "torch_threads": threads,
                                   "device": str(device), "cpu": cpu_name()})  # fmt: skip
                mlflow.set_tags(tracking.run_tags(digest, cfg.sweep, key))
            try:
                with stop_on_signals() as stopped:
                    data = (x_train, y_train, x_test, y_test)
                    loop = (cfg, device, state, on_batch, stopped, ckpt, autocast)
                    _epochs(model, optimizers, data, *loop)
                    after = model.after_training(x_train, y_train, cfg, ckpt, stopped)
                    paths = (model_path, metrics_path, history_path, run_ref_path)
                    final, version = _export(params, model, state, after, paths, ckpt, stopped)
            except (Interrupted, KeyboardInterrupt):
                mlflow.end_run(status="KILLED")
                raise
        ckpt.remove()
    print(f"train: registered {tracking.registered_name(params.model.arch)} version {version}")
    return final


def _export(params, model, state, after, paths, ckpt, stopped) -> tuple[dict, str]:
    """Log, register and write the trained model; checks for a signal between steps."""
    model_path, metrics_path, history_path, run_ref_path = paths
    cfg, arch = params.train, params.model.arch

    def check() -> None:
        if stopped():
            raise Interrupted(
                f"train: interrupted while exporting the trained model; checkpoint {ckpt.path}"
                " -- run again with the same params to finish (outputs are unchanged)"
            )

    check()
    if after:
        mlflow.log_metrics(after)
    with staged_outputs() as out:
        model.cpu().to(memory_format=torch.contiguous_format)  # one file format either way
        save_model(model, params.model, out.path(model_path))
        mlflow.log_artifact(str(out.path(model_path)), artifact_path="checkpoint")
        check()
        model_uri, version = tracking.log_generator(*model.export_module(), arch)
        check()
        final = {k: v for k, v in state.history[-1].items() if k != "epoch"} | after
        final |= {"epochs": cfg.epochs, "n_parameters": n_parameters(model)}
        write_json(out.path(metrics_path), final)
        pd.DataFrame(state.history).to_csv(out.path(history_path), index=False)
        mlflow.log_artifact(str(out.path(history_path)))
        mlflow.set_tag("registered_model_version", f"{tracking.registered_name(arch)}/{version}")
        tracking.write_run_ref(
            out.path(run_ref_path),
            run_id=state.run_id,
            experiment_id=mlflow.active_run().info.experiment_id,
            model_name=tracking.registered_name(arch),
            model_version=version,
            model_uri=model_uri,
        )
        check()
    return final, version


def _epochs(model, optimizers, data, cfg, device, state, on_batch, stopped, ckpt, autocast):
    x_train, y_train, x_test, y_test = data
    n_batches = -(-len(x_train) // cfg.batch_size)
    model.train()
    for epoch in range(state.epoch, cfg.epochs):
        order = epoch_order(len(x_train), cfg.seed, epoch)
        bar = tqdm(total=n_batches, initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0)  # fmt: skip
        for b in range(state.batch, n_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            with autocast():
                parts = model.train_step(xb, yb, optimizers, cfg, epoch)
            floats = parts.as_floats()
            if not math.isfinite(floats["loss"]):
                raise BamError(
                    f"train: loss is {floats['loss']} at epoch {epoch + 1}, batch {b + 1};"
                    f" expected a finite loss (lower train.lr={cfg.lr}?)"
                )
            accumulate(state.sums, floats, len(xb))
            state.seen += len(xb)
            state.batch = b + 1
            bar.set_postfix(loss=f"{state.sums['loss'] / state.seen:.2f}", refresh=False)
            ckpt.end_batch(state, bar, epoch * n_batches + b + 1, on_batch, stopped)
        bar.close()
        row = {"epoch": epoch + 1}
        row |= {f"train_{k}": v / state.seen for k, v in state.sums.items()}
        row |= {f"test_{k}": v for k, v in evaluate(model, x_test, y_test, cfg, device).items()}
        row |= model.on_epoch_end()
        state.history.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.3f}"
            f" (recon {row['train_recon']:.3f}, kl {row['train_kl']:.3f}),"
            f" test loss {row['test_loss']:.3f}"
        )
        state.epoch, state.batch, state.seen = epoch + 1, 0, 0
        state.sums = {}
        ckpt.save(state)
