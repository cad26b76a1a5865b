"""Soft-IntroVAE: plain-VAE warm-up, then separate encoder and decoder steps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from bam_vae.config import ModelConfig, TrainConfig
from bam_vae.models import adam, build_model
from bam_vae.models.base import VAE
from bam_vae.models.introvae import SoftIntroVAE
from bam_vae.models.saved import load_model

CFG = TrainConfig(lr=1e-3, recon="mse")


def make(**intro) -> SoftIntroVAE:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="introvae", z_dim=4, channels=[8, 16], intro=intro))
    assert isinstance(model, SoftIntroVAE)
    return model


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.arange(n) % 10


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def test_shapes_and_loss_weighted_by_intro_betas():
    model = make(beta_rec=2.0, beta_kl=3.0)
    x, y = batch()
    out = model(x, y)
    assert out.logits.shape == (6, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (6, 4)
    parts = model.loss_per_image(out, x, CFG)  # beta_rec/beta_kl, not train.k1/k2
    torch.testing.assert_close(parts.total, 2.0 * parts.recon + 3.0 * parts.kl)
    images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert model.decode(torch.zeros(2, 4)).shape == (2, 1, 28, 28)
    assert len(model.configure_optimizers(CFG)) == 2


def test_warmup_epoch_is_a_plain_vae_step():
    model = make(warmup_epochs=1)
    plain = copy.deepcopy(model)
    x, y = batch()
    torch.manual_seed(2)
    parts = model.train_step(x, y, model.configure_optimizers(CFG), CFG, epoch=0)
    torch.manual_seed(2)
    # One Adam over all weights equals one per half (Adam is per-parameter).
    expected = VAE.train_step(plain, x, y, [adam(plain.parameters(), 1e-3)], CFG, 0)
    assert parts.extra == {}
    torch.testing.assert_close(parts.total, expected.total)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # The next epoch is past the warm-up: the introspective step runs.
    after = model.train_step(x, y, model.configure_optimizers(CFG), CFG, epoch=1)
    assert set(after.extra) == {"exp_fake", "exp_rec", "dec_loss"}


def test_encoder_and_decoder_steps_touch_only_their_half():
    model = make(warmup_epochs=0)
    opt_e, opt_d = model.configure_optimizers(CFG)
    x, _ = batch()
    noise = torch.randn(len(x), 4)

    enc, dec = snapshot(model.encoder), snapshot(model.decoder)
    parts, z = model.encoder_step(x, noise, opt_e, CFG)
    assert not same(model.encoder, enc) and same(model.decoder, dec)
    assert all(p.grad is None for p in model.decoder.parameters())
    assert 0 < parts.extra["exp_fake"] <= 1 and 0 < parts.extra["exp_rec"] <= 1
    torch.testing.assert_close(parts.total, parts.recon + parts.kl)

    enc, dec = snapshot(model.encoder), snapshot(model.decoder)
    dec_loss = model.decoder_step(x, z, noise, opt_d, CFG)
    assert same(model.encoder, enc) and not same(model.decoder, dec)
    assert math.isfinite(dec_loss.item())
    assert all(p.requires_grad for p in model.parameters())  # frozen halves are restored


def test_introspective_train_step_steps_both_optimizers_with_finite_parts():
    model = make(warmup_epochs=0)
    optimizers = model.configure_optimizers(CFG)
    x, y = batch()
    for _ in range(2):
        parts = model.train_step(x, y, optimizers, CFG, epoch=0)
    assert all(len(opt.state) == len(opt.param_groups[0]["params"]) for opt in optimizers)
    assert all(math.isfinite(v) for v in parts.as_floats().values())
    assert set(parts.as_floats()) == {"loss", "recon", "kl", "exp_fake", "exp_rec", "dec_loss"}


def test_bce_reconstruction_also_trains():
    model = make(warmup_epochs=0)
    cfg = TrainConfig(recon="bce")
    x, y = batch()
    parts = model.train_step(x, y, model.configure_optimizers(cfg), cfg, epoch=0)
    assert all(math.isfinite(v) for v in parts.as_floats().values())


@pytest.mark.slow
def test_fit_runs_the_introspective_step_and_registers(project, tiny):
    from bam_vae.stages.train import fit

    params = tiny(
        model={"arch": "introvae", "z_dim": 4, "channels": [8, 16], "intro": {"warmup_epochs": 0}},
        train={"epochs": 1},
    )
    final = fit(params)
    assert all(math.isfinite(v) for v in final.values())
    assert {"train_exp_fake", "train_exp_rec", "train_dec_loss", "test_loss"} <= set(final)
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert ref["model_name"] == "bam-vae-introvae" and int(ref["model_version"]) >= 1
    vae, cfg = load_model(project / "models/vae.pt")
    assert isinstance(vae, SoftIntroVAE) and cfg.intro.warmup_epochs == 0
