"""The loss of equation (2) and the shapes of both architectures."""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch

from bam_vae.config import ModelConfig
from bam_vae.errors import BamError
from bam_vae.models import adam, build_model, n_parameters
from bam_vae.models.base import VAEOutput, kl_per_image, vae_loss
from bam_vae.models.saved import load_model, save_model
from bam_vae.scoring.evaluator import Evaluator, load_evaluator


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
    images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 28, 28)
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0


def test_dense_default_size_matches_report_range():
    n = n_parameters(build_model(ModelConfig(arch="dense", z_dim=16)))
    assert 400_000 <= n <= 800_000


@pytest.mark.parametrize("arch", ["dense", "cnn"])
def test_the_fused_optimiser_applies_textbook_adam(arch):
    """Training uses Adam's fused kernel for speed; given the same gradients for 20 steps, it
    must move every weight as torch's reference (for-loop) Adam does, to float rounding."""
    torch.manual_seed(0)
    ours = build_model(ModelConfig(arch=arch))
    textbook = copy.deepcopy(ours)
    init = [p.detach().clone() for p in ours.parameters()]
    reference = torch.optim.Adam(textbook.parameters(), lr=1e-3, foreach=False)
    optimisers = ((ours, adam(ours.parameters(), 1e-3)), (textbook, reference))
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen) for p in init]
        for model, opt in optimisers:
            assert bool(opt.defaults["fused"]) == (model is ours)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, q, p0 in zip(ours.parameters(), textbook.parameters(), init, strict=True):
        assert not torch.equal(p, p0)  # trained, so the comparison means something
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- corrupt saved models
TINY = ModelConfig(arch="cnn", z_dim=4, channels=[8, 16])
INTERNALS = ("weights_only", "validation error for", "Error(s) in loading", "Traceback")


class NotATensor:
    """Anything torch would have to unpickle: a weights-only load refuses it."""


def _saved(config: dict | None = None, state: dict | None = None) -> dict:
    model = build_model(TINY)
    return {"config": TINY.model_dump() if config is None else config,
            "state_dict": model.state_dict() if state is None else state}  # fmt: skip


def _good_bytes(tmp_path) -> bytes:
    save_model(build_model(TINY), TINY, tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


def _fails(path, load=load_model) -> str:
    with pytest.raises(BamError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert not any(bad in message for bad in INTERNALS), message
    return message


def test_saved_model_round_trips(tmp_path):
    save_model(build_model(TINY), TINY, tmp_path / "vae.pt")
    model, cfg = load_model(tmp_path / "vae.pt")
    assert cfg == TINY and not model.training


def test_model_whose_config_does_not_match_its_weights(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save(_saved({**TINY.model_dump(), "z_dim": 8}), path)
    message = _fails(path)
    assert "its weights do not match its config" in message
    assert "shape mismatch for encoder.5.weight: saved 8x784 vs built 16x784" in message
    assert "decoder.0.weight: saved 784x4 vs built 784x8" in message and "more" not in message
    assert message.endswith("run `bam train` (or `dvc repro`)")


def test_model_with_missing_and_unexpected_weights(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save(_saved({**TINY.model_dump(), "arch": "dense", "hidden": [8]}), path)
    message = _fails(path)
    assert "missing keys: encoder.1.0.weight, encoder.1.0.bias, encoder.1.2.weight and" in message
    assert "unexpected keys: encoder.0.weight, encoder.0.bias, encoder.2.weight and" in message
    assert len(message) < 400
    state = build_model(TINY).state_dict()
    state["extra.weight"] = state.pop("encoder.0.weight")
    torch.save(_saved(state=state), path)
    message = _fails(path)
    assert "(missing keys: encoder.0.weight; unexpected keys: extra.weight)" in message


def test_model_with_an_unknown_arch_names_the_field(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save(_saved({**TINY.model_dump(), "arch": "resnet"}), path)
    message = _fails(path)
    assert "its config is not valid (arch: 'resnet' is not allowed; expected one of" in message
    assert "'cnn'" in message and "'introvae'" in message


def test_pickled_object_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save({"config": NotATensor(), "state_dict": {}}, path)
    message = _fails(path)
    assert f"model file {path} is not a plain-tensor file" in message
    assert "NotATensor" in message and "bam-vae never does" in message


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty", lambda good: b"", "the file is empty"),
        ("cut early", lambda good: good[:10], "not a complete torch file"),
        ("truncated", lambda good: good[: len(good) // 2], "not a complete torch file"),
        ("cut late", lambda good: good[:-30], "not a complete torch file"),
        ("text", lambda good: b"earlier result", "not a complete torch file"),
        ("plain pickle", lambda good: pickle.dumps({"config": {}}), "not a torch file"),
    ],
)
def test_unreadable_file_is_one_line_naming_it(tmp_path, name, content, reason):
    path = tmp_path / "vae.pt"
    path.write_bytes(content(_good_bytes(tmp_path)))
    message = _fails(path)
    assert message.startswith(f"corrupt model file {path}: {reason}"), message


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        ([1, 2], "expected the keys config and state_dict, found a list"),
        ({"config": TINY.model_dump()}, "expected the keys config and state_dict, found keys"),
        ({}, "expected the keys config and state_dict, found no keys"),
        ({"config": [], "state_dict": {}}, "must both be dictionaries"),
        (_saved(state={**_saved()["state_dict"], "decoder.0.weight": 1}), "not tensors"),
        (_saved(collections.OrderedDict(TINY.model_dump(), foo=1)), "unknown key 'foo'"),
    ],
)
def test_wrong_layout_is_one_line(tmp_path, blob, reason):
    path = tmp_path / "vae.pt"
    torch.save(blob, path)
    assert reason in _fails(path)


def test_evaluator_file_errors_name_the_evaluator(tmp_path):
    path = tmp_path / "evaluator.pt"
    torch.save({"config": {"feature_dim": 16}, "state_dict": Evaluator(32).state_dict()}, path)
    message = _fails(path, load_evaluator)
    assert message.startswith(f"corrupt evaluator file {path}: its weights do not match")
    assert message.endswith("run `bam train-evaluator`")
    torch.save({"config": TINY.model_dump(), "state_dict": {}}, path)
    assert "unknown key 'arch'" in _fails(path, load_evaluator)


@pytest.mark.parametrize("arch", ["cnn", "vqvae"])
def test_a_model_saved_with_its_pixelcnn_prior_inside_still_loads(arch, tmp_path):
    """Files written before the VQ-VAE's prior became sampler ``pixelcnn``: every arch saved
    ``vq.prior_*`` params, and a VQ-VAE its ``prior.*`` weights. The model's own weights load."""
    cfg = ModelConfig(arch=arch, channels=[8, 16], vq={"codebook_size": 8, "code_dim": 2})
    model = build_model(cfg)
    config = cfg.model_dump()
    config["vq"] |= {"prior_epochs": 10, "prior_channels": 64, "prior_layers": 5, "prior_lr": 1e-3}
    state = dict(model.state_dict())
    if arch == "vqvae":
        state["prior.head.weight"] = torch.zeros(8, 64, 1, 1)
    torch.save({"config": config, "state_dict": state}, tmp_path / "old.pt")
    loaded, loaded_cfg = load_model(tmp_path / "old.pt")
    assert loaded_cfg == cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ["cnn", "cvae", "rae"])
def test_deeper_conv_nets_with_batch_norm_pad_to_32_and_give_back_28(arch):
    """[128, 256, 512, 1024] with batch norm is the size of RAE's MNIST network (~23 M)."""
    cfg = ModelConfig(arch=arch, z_dim=16, channels=[4, 8, 16, 32], batch_norm=True)
    model = build_model(cfg)
    assert isinstance(model.encoder[0], torch.nn.ZeroPad2d)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4 + 3
    x = torch.rand(5, 1, 28, 28)
    y = torch.arange(5)
    out = model(x, y)
    assert out.logits.shape == (5, 1, 28, 28) and out.mu.shape == (5, 16)
    rae = ModelConfig(arch="rae", z_dim=16, channels=[128, 256, 512, 1024], batch_norm=True)
    assert 21e6 < n_parameters(build_model(rae)) < 24e6


def test_the_report_net_keeps_its_layers_and_their_names():
    """Models saved before the deeper options load unchanged: same modules, same keys."""
    keys = set(build_model(ModelConfig(arch="cnn", channels=[32, 64])).state_dict())
    layers = {"encoder": (0, 2, 5), "decoder": (0, 3, 5)}
    assert keys == {f"{part}.{i}.{w}" for part, idx in layers.items() for i in idx
                    for w in ("weight", "bias")}  # fmt: skip


def test_rae_is_deterministic_and_its_loss_is_the_code_penalty_plus_reconstruction():
    from bam_vae.config import TrainConfig
    from bam_vae.models.base import recon_per_image

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="rae", z_dim=3, channels=[4, 8]))
    x = torch.rand(6, 1, 28, 28)
    a, b = model(x), model(x)
    assert torch.equal(a.z, b.z) and torch.equal(a.z, a.mu) and not a.logvar.any()
    assert torch.equal(model.reconstruct(x), torch.sigmoid(a.logits))
    cfg = TrainConfig(k1=0.5, k2=0.2)
    parts = model.loss_per_image(a, x, cfg)
    code = 0.5 * (a.z**2).sum(1)
    torch.testing.assert_close(parts.total, 0.5 * recon_per_image(a.logits, x, "mse") + 0.2 * code)
    torch.testing.assert_close(parts.extra["latent_l2"], code)
    assert not parts.kl.any()


def test_rae_decays_only_the_decoders_weights():
    """RAE-L2: one Adam step with zero gradients moves exactly the decoder's weight
    matrices and kernels, by Adam's step on the L2 gradient 2 * decoder_l2 * theta."""
    from bam_vae.config import RAEConfig, TrainConfig

    cfg = ModelConfig(arch="rae", z_dim=3, channels=[4, 8], rae=RAEConfig(decoder_l2=0.5))
    model = build_model(cfg)
    before = copy.deepcopy(model.state_dict())
    (opt,) = model.configure_optimizers(TrainConfig(lr=1e-2))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, value in model.state_dict().items():
        moved = not torch.equal(value, before[name])
        assert moved == (name.startswith("decoder.") and name.endswith("weight")), name


def test_vqvae_refuses_deeper_nets_in_one_line():
    from bam_vae.config import parse_params

    with pytest.raises(BamError) as err:
        parse_params({"model": {"arch": "vqvae", "channels": [8, 16, 32]}})
    assert str(err.value) == (
        "model.channels: [8, 16, 32] with batch_norm=False is not allowed for model.arch=vqvae"
        " (its code grid is 7 x 7); expected two channels, no batch norm"
    )
