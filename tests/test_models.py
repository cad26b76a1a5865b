"""The loss of equation (2) and the shapes of both architectures."""

from __future__ import annotations

import pytest
import torch

from bam_vae.config import ModelConfig
from bam_vae.models import Generator, build_model, n_parameters
from bam_vae.models.base import VAEOutput, kl_per_image, vae_loss


def test_loss_matches_hand_computation():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25]).reshape(1, 1, 2, 2)
    logits = torch.zeros(1, 1, 2, 2)  # sigmoid -> 0.5 everywhere
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.0, 2.0]])
    out = VAEOutput(logits=logits, mu=mu, logvar=logvar, z=mu)
    parts = vae_loss(out, x, k1=0.3, k2=0.7, recon="mse")
    # MSE summed over pixels: .25 + .25 + 0 + .0625
    recon = 0.25 + 0.25 + 0.0 + 0.0625
    # KL = -1/2 sum(1 + logvar - mu^2 - exp(logvar)) = -1/2 [(1+0-1-1) + (1+2-4-e^2)]
    kl = -0.5 * ((1 + 0 - 1 - 1) + (1 + 2 - 4 - torch.e**2))
    assert parts.recon.item() == pytest.approx(recon)
    assert parts.kl.item() == pytest.approx(kl)
    assert parts.total.item() == pytest.approx(0.3 * recon + 0.7 * kl)


def test_bce_reconstruction_is_summed_binary_cross_entropy():
    x = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    logits = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    out = VAEOutput(
        logits=logits, mu=torch.zeros(1, 1), logvar=torch.zeros(1, 1), z=torch.zeros(1, 1)
    )
    parts = vae_loss(out, x, k1=1.0, k2=1.0, recon="bce")
    p = torch.sigmoid(torch.tensor(2.0))
    assert parts.recon.item() == pytest.approx(
        -(torch.log(torch.tensor(0.5)) + torch.log(p)).item()
    )


def test_gaussian_reconstruction_is_the_nll_at_the_batch_optimal_variance():
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.5]]).reshape(2, 1, 2, 2)
    logits = torch.zeros(2, 1, 2, 2)  # sigmoid -> 0.5 everywhere
    out = VAEOutput(
        logits=logits, mu=torch.zeros(2, 1), logvar=torch.zeros(2, 1), z=torch.zeros(2, 1)
    )
    sq = (0.5 - x).pow(2).flatten(1)
    var = sq.mean()  # the sigma-VAE's optimum: one variance for every pixel of the batch
    expected = (sq / (2 * var) + 0.5 * torch.log(2 * torch.pi * var)).sum(1).mean()
    parts = vae_loss(out, x, k1=1.0, k2=1.0, recon="gaussian")
    assert parts.recon.item() == pytest.approx(expected.item())
    # It is the variance that minimises the NLL: any other one gives a larger value.
    for other in (var * 0.5, var * 2):
        worse = (sq / (2 * other) + 0.5 * torch.log(2 * torch.pi * other)).sum(1).mean()
        assert worse > expected
    # A perfect reconstruction stays finite: log sigma is floored at -6.
    perfect = vae_loss(
        VAEOutput(logits=torch.full((1, 1, 2, 2), 50.0), mu=torch.zeros(1, 1),
                  logvar=torch.zeros(1, 1), z=torch.zeros(1, 1)),
        torch.ones(1, 1, 2, 2), k1=1.0, k2=1.0, recon="gaussian",
    )  # fmt: skip
    assert torch.isfinite(perfect.recon)


def test_kl_of_standard_normal_posterior_is_zero():
    assert kl_per_image(torch.zeros(5, 16), torch.zeros(5, 16)).abs().max().item() == 0.0


def test_loss_is_batch_mean_of_per_image_sums():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="dense", z_dim=3, hidden=[32, 16]))
    x = torch.rand(6, 1, 28, 28)
    out = model(x)
    rows = [
        VAEOutput(out.logits[i : i + 1], out.mu[i : i + 1], out.logvar[i : i + 1], out.z[i : i + 1])
        for i in range(6)
    ]
    one = [vae_loss(row, x[i : i + 1], 0.5, 0.5, "mse").total for i, row in enumerate(rows)]
    assert vae_loss(out, x, 0.5, 0.5, "mse").total.item() == pytest.approx(
        torch.stack(one).mean().item(), rel=1e-5
    )


@pytest.mark.parametrize("arch", ["dense", "cnn"])
@pytest.mark.parametrize("z_dim", [1, 16, 2048])
def test_shapes(arch, z_dim):
    model = build_model(ModelConfig(arch=arch, z_dim=z_dim))
    out = model(torch.rand(3, 1, 28, 28))
    assert out.logits.shape == (3, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, z_dim)
    images = Generator(model)(torch.randn(5, z_dim))
    assert images.shape == (5, 1, 28, 28)
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0


def test_dense_default_size_matches_report_range():
    n = n_parameters(build_model(ModelConfig(arch="dense", z_dim=16)))
    assert 400_000 <= n <= 800_000
