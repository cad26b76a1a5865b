"""The CUDA path: the tiny pipeline's training on the GPU, where there is one."""

from __future__ import annotations

import pytest
import torch

from bam_vae.train import fit

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
