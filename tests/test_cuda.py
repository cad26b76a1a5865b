"""The CUDA path: the tiny pipeline trained, sampled and scored on the GPU, where there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bam_vae.stages.compute_fid import compute
from bam_vae.stages.fid_reference import reference
from bam_vae.stages.fit_sampler import fit_sampler
from bam_vae.stages.generate import generate
from bam_vae.stages.train import fit
from bam_vae.stages.train_evaluator import train_evaluator

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the CUDA path is exercised where there is one",
)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_training_on_cuda_tracks_the_cpu(precision, project, tiny):
    cpu = fit(tiny(train={"device": "cpu", "precision": precision}))
    gpu = fit(tiny(train={"device": "cuda", "precision": precision}))
    # Posterior noise is drawn on the device, so the runs differ by more than rounding.
    assert gpu["test_loss"] == pytest.approx(cpu["test_loss"], rel=0.05)
    again = fit(tiny(train={"device": "cuda", "precision": precision}))
    assert again == gpu  # deterministic per device and setting


@pytest.mark.parametrize("sampler", ["prior", "gmm"])
def test_sampling_and_scoring_on_cuda_give_the_cpu_numbers(sampler, project, tiny):
    """Same model, same seed: latents are drawn on the CPU, so only float rounding differs."""
    params = tiny(generate={"n": 200, "sampler": sampler, "gmm": {"components": 3}},
                  evaluator={"epochs": 1, "feature_dim": 16, "threads": 1},
                  fid={"kid_subsets": 3, "kid_subset_size": 50})  # fmt: skip
    fit(params)
    train_evaluator(params.evaluator, params.data.out_dir)
    results = {}
    for device in ("cpu", "cuda"):
        on = params.model_copy(
            update={
                "generate": params.generate.model_copy(update={"device": device}),
                "fid": params.fid.model_copy(update={"device": device}),
            }
        )
        reference(on, "classifier")
        fit_sampler(on)
        generate(on)
        results[device] = (np.load("data/generated/images.npy"), compute(on))
    (cpu_images, cpu), (gpu_images, gpu) = results["cpu"], results["cuda"]
    np.testing.assert_allclose(gpu_images, cpu_images, atol=1e-3)
    assert gpu["fid_classifier"] == pytest.approx(cpu["fid_classifier"], rel=1e-3)
    assert gpu["confident_share"] == pytest.approx(cpu["confident_share"], abs=0.01)


def test_cuda_graphs_train_like_eager_steps(project, tiny):
    eager = fit(tiny(train={"device": "cuda"}))
    graphs = fit(tiny(train={"device": "cuda", "cuda_graphs": True}))
    assert graphs["test_loss"] == pytest.approx(eager["test_loss"], rel=0.05)
    assert fit(tiny(train={"device": "cuda", "cuda_graphs": True})) == graphs  # deterministic


def test_a_registered_version_predicts_on_the_gpu(project, tiny):
    import mlflow
    import pandas as pd

    fit(tiny(train={"device": "cuda"}))
    on_gpu = mlflow.pyfunc.load_model("models:/bam-vae-cnn/1")
    on_cpu = mlflow.pyfunc.load_model("models:/bam-vae-cnn/1", model_config={"device": "cpu"})
    request = pd.DataFrame({"n": [16], "seed": [0]})
    np.testing.assert_allclose(on_gpu.predict(request), on_cpu.predict(request), atol=1e-4)
