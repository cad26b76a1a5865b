"""Training: deterministic, resumable after a signal, tracked and registered in MLflow."""

from __future__ import annotations

import json
import math
import signal
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bam_vae.errors import BamError, Interrupted
from bam_vae.machine import cpu_name
from bam_vae.models.saved import load_model
from bam_vae.stages.train import fit, run_key, training_images
from bam_vae.tracking import store as tracking
from bam_vae.training.checkpoints import checkpoint_path
from bam_vae.training.loop import CosineDecay


def weights(path="models/vae.pt"):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_same_params_and_seed_give_identical_results(project, tiny):
    params = tiny()
    first = fit(params)
    w1, bytes1 = weights(), (project / "models/vae.pt").read_bytes()
    second = fit(params)
    assert first == second
    for key, value in weights().items():
        assert torch.equal(value, w1[key]), key
    # Byte-identical file, so DVC sees the same output hash on every rerun.
    assert (project / "models/vae.pt").read_bytes() == bytes1


@pytest.mark.parametrize(
    ("schedule", "ema"), [("constant", 0.0), ("cosine", 0.0), ("constant", 0.9)]
)
@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(project, tiny, schedule, ema):
    params = tiny(train={"epochs": 2, "lr_schedule": schedule, "ema": ema})
    expected = fit(params)
    w_expected = weights()
    run_ref = json.loads((project / "models/mlflow_run.json").read_text())

    def send_sigint(step):  # a real signal, mid-way through the first epoch
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    (project / "models/vae.pt").unlink()
    with pytest.raises(Interrupted, match="resume"):
        fit(params, on_batch=send_sigint)
    assert not (project / "models/vae.pt").exists()  # nothing half-written
    ckpts = list((project / ".cache/checkpoints").glob("train-*.pt"))
    assert len(ckpts) == 1
    interrupted_run = tracking.client().search_runs(["1"], order_by=["start_time DESC"])[0]
    assert interrupted_run.info.status == "KILLED"

    time.sleep(3)  # a pause the resumed epoch's running time must leave out
    resumed = fit(params)
    assert resumed == expected
    for key, value in weights().items():
        assert torch.equal(value, w_expected[key]), key
    assert not ckpts[0].exists()  # consumed
    # The resumed training continues the same MLflow run instead of starting another.
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert ref["run_id"] == interrupted_run.info.run_id != run_ref["run_id"]
    run = mlflow.get_run(ref["run_id"])
    assert run.info.status == "FINISHED"
    history = tracking.client().get_metric_history(ref["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2]
    # Each epoch's running time, the 3 s pause between the interrupt and the resume left out.
    seconds = tracking.client().get_metric_history(ref["run_id"], "epoch_seconds")
    assert [m.step for m in seconds] == [1, 2]
    span = (history[0].timestamp - interrupted_run.info.start_time) / 1000
    assert 0 < seconds[0].value < span - 3


def test_weight_ema_is_the_textbook_average_of_every_steps_weights_and_buffers():
    from bam_vae.training.loop import WeightEMA

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(net, decay=0.75)
    expected = None
    for step in range(1, 5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(step)
            net[1].running_mean.add_(step)
        ema.on_batch_end(step)
        now = {k: v.clone().float() for k, v in net.state_dict().items() if v.is_floating_point()}
        expected = now if expected is None else {
            k: 0.75 * expected[k] + 0.25 * now[k] for k in now}  # fmt: skip
    averaged = ema.averaged.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value)


@pytest.mark.slow
def test_ema_weights_are_the_ones_saved_and_sampled(project, tiny):
    fit(tiny(train={"epochs": 2}))
    last = weights()
    averaged = tiny(train={"epochs": 2, "ema": 0.9})
    result = fit(averaged)
    saved = weights()
    assert not all(torch.equal(v, last[k]) for k, v in saved.items())
    model, _ = load_model(project / "models/vae.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert fit(averaged) == result  # deterministic


def test_cosine_schedule_decays_every_optimisers_rate_from_train_lr_to_zero():
    nets = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]  # introvae steps two optimisers
    optimizers = [
        torch.optim.Adam(n.parameters(), lr=lr) for n, lr in zip(nets, (1e-3, 4e-4), strict=True)
    ]
    decay = CosineDecay(optimizers, total_steps=8)
    rates = []
    for step in range(1, 9):
        for o in optimizers:  # as the loop does: the optimiser steps, then the schedule
            o.step()
        decay.on_batch_end(step)
        rates.append([o.param_groups[0]["lr"] for o in optimizers])
    expected = [[lr * 0.5 * (1 + math.cos(math.pi * s / 8)) for lr in (1e-3, 4e-4)]
                for s in range(1, 9)]  # fmt: skip
    np.testing.assert_allclose(rates, expected, rtol=1e-12, atol=1e-15)
    assert rates[3] == pytest.approx([5e-4, 2e-4]) and rates[-1] == pytest.approx([0, 0])


@pytest.mark.slow
def test_cosine_schedule_changes_the_weights_and_is_deterministic(project, tiny):
    fit(tiny(train={"epochs": 2}))
    constant = weights()
    cosine = tiny(train={"epochs": 2, "lr_schedule": "cosine"})
    first = fit(cosine)
    w1 = weights()
    assert fit(cosine) == first
    assert all(torch.equal(v, w1[k]) for k, v in weights().items())
    assert not all(torch.equal(v, constant[k]) for k, v in w1.items())


@pytest.mark.slow
def test_mlflow_run_holds_params_curves_tags_and_a_registered_version(project, tiny, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-fish")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a short run
    params = tiny(train={"epochs": 2}, sweep={"name": "unit"})
    final = fit(params)
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert (project / "mlruns/mlflow.db").is_file()
    run = tracking.client().get_run(ref["run_id"])
    assert run.data.params["model.z_dim"] == "4"
    assert run.data.params["train.k1"] == "0.5"
    assert run.data.params["cpu"] == cpu_name() != ""  # speeds compare only on one processor
    assert run.data.tags["dvc_exp_name"] == "tidy-fish"
    assert run.data.tags["sweep"] == "unit"
    assert len(run.data.tags["data_sha256"]) == 64
    assert run.data.metrics["test_loss"] == pytest.approx(final["test_loss"])
    # The data as MLflow 3 dataset inputs (file, SHA-256), and system metrics while training.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-test", "mnist-train"]
    train_input = inputs["mnist-train"]
    assert [t.value for t in train_input.tags if t.key == "mlflow.data.context"] == ["training"]
    sha = next(t.value for t in train_input.tags if t.key == "sha256")
    assert len(sha) == 64 and train_input.dataset.digest == sha[:32]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    steps = tracking.client().get_metric_history(ref["run_id"], "test_kl")
    assert [m.step for m in steps] == [1, 2]
    # Artifacts live under mlruns/artifacts of the project, not the working directory.
    assert run.info.artifact_uri.startswith((project / "mlruns/artifacts").as_uri())

    version = tracking.client().get_model_version("bam-vae-cnn", ref["model_version"])
    assert version.run_id == ref["run_id"]
    generator = mlflow.pyfunc.load_model(f"models:/bam-vae-cnn/{ref['model_version']}")
    vae, cfg = load_model(project / "models/vae.pt")
    z = torch.randn(7, cfg.z_dim)
    with torch.no_grad():
        expected = torch.sigmoid(vae.decode(z))[:, 0].numpy()
    got = generator.predict(pd.DataFrame({"latents": [z.tolist()]}))
    np.testing.assert_allclose(got, expected, atol=1e-6)

    history = (project / "metrics/train_history.csv").read_text().splitlines()
    assert history[0].split(",")[:4] == ["epoch", "train_loss", "train_recon", "train_kl"]
    assert len(history) == 3
    assert "epoch_seconds" in run.data.metrics and "epoch_seconds" not in history[0]


@pytest.mark.slow
def test_each_training_registers_a_new_version(project, tiny):
    fit(tiny())
    fit(tiny(model={"z_dim": 2}))
    versions = tracking.client().search_model_versions("name='bam-vae-cnn'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_dense_architecture_trains(project, tiny):
    final = fit(tiny(model={"arch": "dense", "hidden": [32, 16]}, train={"epochs": 1}))
    assert final["n_parameters"] > 0
    assert (
        json.loads((project / "models/mlflow_run.json").read_text())["model_name"]
        == "bam-vae-dense"
    )


def test_train_fraction_and_noise_are_seeded(tiny):
    cfg = tiny(train={"train_fraction": 0.25, "noise_fraction": 0.5, "noise_std": 0.3}).train
    images = torch.randint(0, 256, (400, 28, 28), dtype=torch.uint8)
    labels = images[:, 0, 0].long() % 10  # a label each image carries in its first pixel
    (a, ya), (b, yb) = training_images(cfg, images, labels), training_images(cfg, images, labels)
    assert a.shape == (100, 1, 28, 28) and ya.shape == (100,)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert a.min().item() >= 0.0 and a.max().item() <= 1.0
    clean, y_clean = training_images(cfg.model_copy(update={"noise_fraction": 0.0}), images, labels)
    assert torch.equal((clean[:, 0, 0, 0] * 255).round().long() % 10, y_clean)
    changed = (a != clean).flatten(1).any(dim=1).float().mean().item()
    assert changed == pytest.approx(0.5)


def test_missing_prepared_data_is_a_clear_error(project, tiny):
    params = tiny()
    params = params.model_copy(
        update={"data": params.data.model_copy(update={"out_dir": "nowhere"})}
    )
    with pytest.raises(BamError, match="nowhere/train.pt not found; run `bam prepare`"):
        fit(params)


def test_checkpoint_key_changes_with_params(tiny):
    assert run_key(tiny(), "d") != run_key(tiny(train={"lr": 0.01}), "d")
    assert checkpoint_path("abc").name == "train-abc.pt"


def test_diverging_training_fails_clearly_and_marks_the_run_failed(project, tiny):
    with pytest.raises(BamError, match=r"loss is (inf|nan) at epoch 1.*train.lr=1000000000"):
        fit(tiny(train={"lr": 1e9, "epochs": 1}))
    (run,) = tracking.client().search_runs(["1"])
    assert run.info.status == "FAILED"
    assert not (project / "models/vae.pt").exists()


def test_threads_split_the_cores_between_parallel_workers(monkeypatch):
    from bam_vae.training import runtime as train

    before = torch.get_num_threads()
    monkeypatch.setattr(train, "available_cores", lambda: 8)
    try:
        monkeypatch.setenv("BAM_PARALLEL_JOBS", "2")
        assert train.configure_threads(0) == 4 == torch.get_num_threads()
        assert train.configure_threads(1) == 1 == torch.get_num_threads()  # the param wins
        monkeypatch.delenv("BAM_PARALLEL_JOBS")
        assert train.configure_threads(0) == 8
    finally:
        torch.set_num_threads(before)


FAULTS_PER_STEP = """
import resource, sys, torch
from bam_vae.config import ModelConfig
from bam_vae.models import adam, build_model, vae_loss
from bam_vae.training.runtime import configure_threads, fast_path
if sys.argv[1] == "retain":
    configure_threads(1)
else:
    torch.set_num_threads(1)
model = build_model(ModelConfig(arch="cnn"))
fast_path(model, "fp32", torch.device("cpu"))
opt = adam(model.parameters(), 1e-3)
x = torch.rand(128, 1, 28, 28)
def steps(n):
    for _ in range(n):
        opt.zero_grad()
        vae_loss(model(x), x, 0.5, 0.5, "mse").total.backward()
        opt.step()
steps(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.slow
def test_training_steps_stop_faulting_memory_in_once_threads_are_configured():
    """Every stage calls configure_threads first; after it, a training step reuses the memory
    the previous one freed instead of faulting fresh zeroed pages in from the kernel."""
    import subprocess
    import sys

    def faults(mode):
        run = [sys.executable, "-c", FAULTS_PER_STEP, mode]
        return float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    plain, retained = faults("plain"), faults("retain")
    print(f"page faults per CNN step: glibc's defaults {plain:.0f}, retained {retained:.0f}")
    assert retained * 10 < plain  # seen here: ~2 300-6 400 against 0-80


@pytest.mark.parametrize(
    "env", [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}]
)
def test_a_users_own_malloc_settings_win(env, monkeypatch):
    from bam_vae.training import runtime as train

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train.retain_freed_memory() is False


@pytest.mark.slow
def test_bf16_training_is_deterministic_and_tracks_fp32(project, tiny):
    fp32 = fit(tiny(train={"epochs": 2}))
    params = tiny(train={"epochs": 2, "precision": "bf16"})
    first = fit(params)
    w1 = weights()
    assert fit(params) == first
    for key, value in weights().items():
        assert torch.equal(value, w1[key]), key
        assert value.is_contiguous()  # saved in the one file format, whatever the training layout
    assert first["test_loss"] == pytest.approx(fp32["test_loss"], rel=0.05)
    assert first != fp32  # it really ran in bf16


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dense", "cvae", "vqvae", "introvae"])
def test_bf16_trains_every_arch(arch, project, tiny):
    model = {"arch": arch, "hidden": [32, 16]}
    if arch == "vqvae":
        model["vq"] = {"codebook_size": 16, "code_dim": 4}
    if arch == "introvae":  # its own step in the one epoch, not the plain-VAE warm-up
        model["intro"] = {"warmup_epochs": 0}
    final = fit(tiny(model=model, train={"epochs": 1, "precision": "bf16"}))
    assert math.isfinite(final["test_loss"])


def test_cuda_graphs_on_a_cpu_are_refused_before_any_work(project, tiny):
    with pytest.raises(BamError, match=r"train.cuda_graphs: true needs a CUDA device.*expected"
                       r" train.cuda_graphs=false"):  # fmt: skip
        fit(tiny(train={"device": "cpu", "cuda_graphs": True}))
    assert not (project / "models").exists() and not (project / "mlruns").exists()


def test_a_training_that_changes_no_weight_registers_nothing(project, tiny):
    # Each value is allowed, yet an Adam step of 1e-30 rounds away in float32.
    params = tiny(train={"lr": 1e-30, "epochs": 1})
    with pytest.raises(BamError) as info:
        fit(params)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train: no weight changed in 1 epoch(s) (train_loss ")
    assert "nothing registered" in message and "train.lr" in message
    assert not (project / "models").exists() or not list((project / "models").iterdir())
    assert not list((project / ".cache/checkpoints").glob("train-*.pt"))
    assert tracking.client().search_registered_models() == []
    [run] = tracking.client().search_runs(["1"])
    assert run.info.status == "FAILED"
