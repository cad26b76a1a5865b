"""Stage ``train``: fit a VAE on prepared MNIST, track it in MLflow, register its generator.

Batches are sliced from one in-memory float tensor (no per-sample PIL or ``ToTensor``), in
the one training loop (``training/loop.py``): SIGINT/SIGTERM stop after the current batch and
leave a checkpoint; the next run with the same params resumes from it and ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch

from bam_vae import paths
from bam_vae.config import Params, TrainConfig
from bam_vae.datasets import data_sha256, load_info, load_split
from bam_vae.errors import BamError, Interrupted
from bam_vae.files import staged_outputs, write_json
from bam_vae.machine import cpu_name
from bam_vae.models import build_model, n_parameters, on_device
from bam_vae.models.saved import save_model
from bam_vae.serving import publish
from bam_vae.tracking import registry
from bam_vae.tracking import store as tracking
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key, stop_on_signals
from bam_vae.training.loop import (
    Callback,
    CosineDecay,
    Loop,
    OnBatch,
    WeightEMA,
    accumulate,
    n_batches,
)
from bam_vae.training.loop import fit as fit_loop
from bam_vae.training.runtime import (
    configure_threads,
    fast_path,
    resolve_device,
    seed_everything,
    training_step,
)

EVAL_SEED = 12345  # fixed posterior noise for test losses, so epochs compare like with like


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


def run_key(params: Params, data_digest: str) -> str:
    return config_key(params.model.active(), params.train.model_dump(), data_digest)


class LogEpochs(Callback):
    """Each epoch's history row and wall time (``epoch_seconds``) as MLflow metrics of the
    active run, stepped by epoch."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


@torch.no_grad()
def evaluate(model, x, y, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Test losses (``test_loss``, ``test_recon``, ``test_kl``...), per image, with fixed
    posterior noise (``EVAL_SEED``)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    sums: dict[str, float] = {}
    for start in range(0, len(x), 1000):
        xb, yb = x[start : start + 1000], y[start : start + 1000]
        accumulate(sums, model.loss(model(xb, yb, generator=gen), xb, cfg).as_floats(), len(xb))
    model.train()
    return {f"test_{k}": v / len(x) for k, v in sums.items()}


def fit(
    params: Params,
    model_path: Path = paths.MODEL,
    metrics_path: Path = paths.TRAIN_METRICS,
    history_path: Path = paths.TRAIN_HISTORY,
    run_ref_path: Path = paths.RUN_REF,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Run the stage. ``on_batch(step)`` is called after each optimiser step (tests use it).

    All or nothing: the outputs are written aside and moved into place only after the model
    is logged and registered, so a failure or a signal at any point leaves the previous
    outputs as they were, the MLflow run KILLED (or FAILED) and a checkpoint to resume."""
    cfg = params.train
    device = resolve_device(cfg.device)
    if cfg.cuda_graphs and device.type != "cuda":
        raise BamError(
            f"train.cuda_graphs: true needs a CUDA device and train.device={cfg.device} runs on"
            f" {device.type} here; expected train.cuda_graphs=false (graphs only cut GPU"
            " kernel-launch costs)"
        )
    # An unreachable tracking server, or one that refuses this user, fails here, before work.
    tracking.init(writes="train writes its run")
    threads = configure_threads(cfg.threads)
    train_images, train_labels = load_split(params.data.out_dir, "train")
    test_images, test_labels = load_split(params.data.out_dir, "test")
    digest = data_sha256(train_images, test_images)
    dataset = load_info(params.data.out_dir)
    tracking.require_model(
        registry.registered_name(params.model.arch, dataset.name), "train registers a version"
    )

    seed_everything(cfg.seed)
    x_train, y_train = training_images(cfg, train_images, train_labels)
    x_test = test_images.float().div_(255.0).unsqueeze(1)
    # Moved once: batches are sliced on the device, no per-batch host copies.
    x_train, y_train, x_test, y_test = on_device(device, x_train, y_train, x_test, test_labels)
    model = build_model(params.model, dataset.n_classes).to(device)
    autocast = fast_path(model, cfg.precision, device)
    optimizers = model.configure_optimizers(cfg)
    n_steps = cfg.epochs * n_batches(len(x_train), cfg.batch_size)
    schedule = [CosineDecay(optimizers, n_steps)] if cfg.lr_schedule == "cosine" else []
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    # What is evaluated, saved and sampled: the EMA of the weights when train.ema is set.
    kept = ema.averaged.module if ema else model

    key = run_key(params, digest)
    ckpt = Checkpoint(checkpoint_path(key), model, [*optimizers, *([ema] if ema else [])], "train")
    with ckpt.owned():
        initial = [p.detach().clone() for p in model.parameters()]  # before resume loads any
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
                    tracking.log_dataset(path, sha, context, len(images), dataset)
                logged = params.model_dump(mode="json") | {"model": params.model.active()}
                mlflow.log_params(tracking.flat_params(logged))
                mlflow.log_params({"n_parameters": n_parameters(model),
                                   "n_train_images": len(x_train), "torch_threads": threads,
                                   "device": str(device), "cpu": cpu_name()})  # fmt: skip
                mlflow.set_tags(
                    tracking.run_tags(digest, params.sweep.name, key) | {"dataset": dataset.name}
                )

            train_step = training_step(model, cfg.cuda_graphs)

            def step(idx: torch.Tensor, epoch: int) -> dict[str, float]:
                with autocast():
                    parts = train_step(x_train[idx], y_train[idx], optimizers, cfg, epoch)
                return parts.as_floats()

            callbacks: list[Callback] = [*schedule, *([ema] if ema else []), LogEpochs()]
            callbacks += [OnBatch(on_batch)] if on_batch else []

            def end_epoch() -> dict[str, float]:
                return evaluate(kept, x_test, y_test, cfg, device) | model.on_epoch_end()

            loop = Loop(
                "train", len(x_train), cfg.batch_size, cfg.epochs, step, ckpt, cfg.seed,
                evaluate=end_epoch, lr_key=f"train.lr={cfg.lr}", callbacks=callbacks,
            )  # fmt: skip
            try:
                with stop_on_signals() as stopped:
                    model.train()
                    state = fit_loop(loop, state)
                    if all(map(torch.equal, model.parameters(), initial)):
                        ckpt.remove()
                        raise BamError(_untrained(state.history))
                    outputs = (model_path, metrics_path, history_path, run_ref_path)
                    final, name, version = _export(
                        params, kept, state, outputs, ckpt, stopped, dataset
                    )
            except (Interrupted, KeyboardInterrupt):
                mlflow.end_run(status="KILLED")
                raise
        ckpt.remove()
    print(f"train: registered {name} version {version}")
    return final


def _untrained(history: list[dict[str, float]]) -> str:
    losses = sorted({f"{row['train_loss']:.4g}" for row in history})
    return (
        f"train: no weight changed in {len(history)} epoch(s) (train_loss {', '.join(losses)});"
        " nothing registered -- expected settings that train (check train.lr, train.k1,"
        " train.k2)"
    )


def _export(params, model, state, outputs, ckpt, stopped, dataset) -> tuple[dict, str, str]:
    """Log, register and write the trained model; checks for a signal between steps.
    Returns (final metrics, registered model name, version)."""
    model_path, metrics_path, history_path, run_ref_path = outputs
    cfg, name = params.train, registry.registered_name(params.model.arch, dataset.name)

    def check() -> None:
        if stopped():
            raise Interrupted(
                f"train: interrupted while exporting the trained model; checkpoint {ckpt.path}"
                " -- run again with the same params to finish (outputs are unchanged)"
            )

    check()
    with staged_outputs() as out:
        model.cpu().to(memory_format=torch.contiguous_format)  # one file format either way
        save_model(model, params.model, out.path(model_path))
        mlflow.log_artifact(str(out.path(model_path)), artifact_path="checkpoint")
        check()
        model_uri, version = publish.log_generator(
            model, params.model, out.path(model_path), dataset
        )
        check()
        final = {k: v for k, v in state.history[-1].items() if k != "epoch"}
        final |= {"epochs": cfg.epochs, "n_parameters": n_parameters(model)}
        write_json(out.path(metrics_path), final)
        pd.DataFrame(state.history).to_csv(out.path(history_path), index=False)
        mlflow.log_artifact(str(out.path(history_path)))
        mlflow.set_tag("registered_model_version", f"{name}/{version}")
        tracking.write_run_ref(
            out.path(run_ref_path),
            run_id=state.run_id,
            experiment_id=mlflow.active_run().info.experiment_id,
            model_name=name,
            model_version=version,
            model_uri=model_uri,
        )
        check()
    return final, name, version
