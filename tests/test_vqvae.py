"""VQ-VAE: shapes and loss parts, the EMA codebook, straight-through gradients, its causal
PixelCNN code prior (a sampler), and one tiny run through the real stages."""

from __future__ import annotations

import json
import signal

import mlflow
import pandas as pd
import pytest
import torch
from helpers import PIXELCNN_TINY

from bam_vae.config import TrainConfig, VQConfig
from bam_vae.models.vqvae import EPS, VQVAE, VectorQuantizerEMA
from bam_vae.samplers.pixelcnn import PixelCNN
from bam_vae.tracking import store as tracking

VQ = VQConfig(codebook_size=8, code_dim=3)


def tiny_model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE([4, 8], VQ)


def test_shapes_and_loss_parts():
    model = tiny_model().eval()  # eval: the codebook stays put between the calls below
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert model.z_dim == 7 * 7 * 3
    assert out.logits.shape == (5, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (5, model.z_dim)
    assert out.logvar.abs().max().item() == 0.0
    # The decoder saw codebook vectors: z is the codes' vectors, flattened channel-major.
    codes = model.codes(x)
    assert codes.shape == (5, 7, 7) and codes.dtype == torch.int64
    assert torch.allclose(out.z, model.latent(x), atol=1e-6)

    cfg = TrainConfig(recon="bce")
    parts = model.loss_per_image(out, x, cfg)
    commit = VQ.commitment * (out.mu - out.z).pow(2).sum(1)
    assert parts.kl.shape == (5,) and parts.kl.abs().max().item() == 0.0
    assert torch.allclose(parts.extra["commit"], commit, atol=1e-6)
    assert torch.allclose(parts.total, parts.recon + commit)
    assert model.loss(out, x, cfg).as_floats().keys() == {"loss", "recon", "kl", "commit"}

    recon = model.reconstruct(x)
    assert recon.shape == (5, 1, 28, 28) and 0.0 <= recon.min() <= recon.max() <= 1.0


def test_ema_update_matches_hand_computation():
    vq = VectorQuantizerEMA(2, 2, decay=0.5)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.embed_sum.copy_(vq.codebook)  # cluster sizes start at 1: embed_sum = 1 * codebook
    vectors = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])  # all nearest 0
    grid = vectors.T.reshape(1, 2, 2, 2)  # (N, D, H, W)

    vq.eval()
    idx, q = vq(grid)
    assert idx.flatten().tolist() == [0, 0, 0, 0]
    assert q.abs().max().item() == 0.0  # quantised with the codebook before any update
    assert vq.codebook[1].tolist() == [10.0, 10.0] and vq.usage.sum() == 0  # eval: no update

    vq.train()
    vq(grid)
    # EMA with decay 0.5: sizes 0.5*1 + 0.5*4 = 2.5 and 0.5*1 + 0.5*0 = 0.5;
    # sums 0.5*(0, 0) + 0.5*(4, 4) = (2, 2) and 0.5*(10, 10) = (5, 5).
    assert vq.cluster_size.tolist() == [2.5, 0.5]
    assert vq.embed_sum.tolist() == [[2.0, 2.0], [5.0, 5.0]]
    # Laplace smoothing: size_k = (size_k + eps) / (n + K eps) * n with n = 3.
    n = 3.0
    size0 = (2.5 + EPS) / (n + 2 * EPS) * n
    size1 = (0.5 + EPS) / (n + 2 * EPS) * n
    # Code 0 moves from (0, 0) towards the batch mean (1, 1): 2 / 2.5 = 0.8 before smoothing.
    assert vq.codebook[0].tolist() == pytest.approx([2.0 / size0] * 2, rel=1e-6)
    assert 2.0 / size0 == pytest.approx(0.8, rel=1e-5)
    # Code 1 saw nothing: 5 / 0.5 = 10 exactly without smoothing, 9.99993... with it.
    assert vq.codebook[1].tolist() == pytest.approx([5.0 / size1] * 2, rel=1e-6)
    assert 5.0 / size1 == pytest.approx(9.9998667, rel=1e-7)

    assert vq.usage.tolist() == [4.0, 0.0]
    stats = vq.epoch_stats()
    assert stats == pytest.approx({"codebook_usage": 0.5, "perplexity": 1.0})
    assert vq.usage.sum() == 0  # reset for the next epoch


def test_epoch_stats_perplexity_of_uniform_usage():
    vq = VectorQuantizerEMA(4, 2, decay=0.9)
    vq.usage.copy_(torch.tensor([3.0, 3.0, 0.0, 3.0]))
    assert vq.epoch_stats() == pytest.approx({"codebook_usage": 0.75, "perplexity": 3.0})


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny_model().train()
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    # The reconstruction alone, through the non-differentiable nearest-neighbour step.
    model.loss_per_image(out, x, TrainConfig()).recon.sum().backward()
    grad = model.encoder[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert not any(b.requires_grad for b in model.quantizer.buffers())


def test_every_weight_is_optimised_and_no_prior_is_inside_the_model():
    model = tiny_model()
    assert not any(k.startswith("prior.") for k in model.state_dict())
    (optimizer,) = model.configure_optimizers(TrainConfig())
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters()}


def test_prior_is_causal_in_raster_order():
    torch.manual_seed(0)
    prior = PixelCNN(n_codes=5, channels=8, layers=3)
    codes = torch.randint(0, 5, (2, 7, 7))
    logits = prior(codes).flatten(2)  # (N, K, 49)
    for i in range(49):
        changed = codes.clone().flatten(1)
        changed[:, i:] = torch.randint(0, 5, (2, 49 - i))
        changed = changed.reshape(2, 7, 7)
        after = prior(changed).flatten(2)
        # Blind to position i and later (masked weights are exact zeros; atol for conv kernels).
        assert torch.allclose(after[:, :, : i + 1], logits[:, :, : i + 1], rtol=0, atol=1e-6), i
    # ...but not to the past: the last position sees the one before it.
    changed = codes.clone().flatten(1)
    changed[:, 47] = (changed[:, 47] + 1) % 5
    assert not torch.allclose(prior(changed.reshape(2, 7, 7))[:, :, 6, 6], logits[:, :, 48])


def test_sampling_is_valid_and_seeded():
    model = tiny_model().eval()
    images = model.sample(3, torch.Generator().manual_seed(1))
    assert images.shape == (3, 1, 28, 28)
    assert 0.0 <= images.min().item() <= images.max().item() <= 1.0
    again = model.sample(3, torch.Generator().manual_seed(1))
    assert torch.equal(images, again)
    torch.manual_seed(0)
    prior = PixelCNN(VQ.codebook_size, channels=8, layers=2)
    codes = prior.sample(4, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert codes.shape == (4, 7, 7) and codes.dtype == torch.int64
    assert 0 <= codes.min().item() <= codes.max().item() < VQ.codebook_size


def test_embedded_codes_decode_to_the_reconstruction():
    model = tiny_model().eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        images = torch.sigmoid(model.decode(model.embed_codes(model.codes(x))))
    assert torch.allclose(images, model.reconstruct(x), atol=1e-6)


VQ_TINY = {"codebook_size": 16, "code_dim": 4}


@pytest.mark.slow
def test_one_epoch_through_the_real_stages(project, tiny):
    from bam_vae.stages.fit_sampler import fit_sampler
    from bam_vae.stages.generate import generate
    from bam_vae.stages.train import fit

    params = tiny(
        model={"arch": "vqvae", "channels": [8, 16], "vq": VQ_TINY}, train={"epochs": 1},
        generate={"n": 20, "pixelcnn": PIXELCNN_TINY},
    )  # fmt: skip
    final = fit(params)
    assert 0 < final["codebook_usage"] <= 1 and 1 <= final["perplexity"] <= 16
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert ref["model_name"] == "bam-vae-vqvae"
    history = tracking.client().get_metric_history(ref["run_id"], "perplexity")
    assert [m.step for m in history] == [1]
    # The registered generator decodes code grids as they are: int64 7 x 7 codes in, images out.
    generator = mlflow.pyfunc.load_model(ref["model_uri"])
    images = generator.predict(pd.DataFrame({"latents": [[[[0] * 7] * 7] * 3]}))
    assert images.shape == (3, 28, 28)

    # The default sampler (auto) of a VQ-VAE is its PixelCNN code prior, fitted by fit-sampler.
    metrics = fit_sampler(params)
    assert metrics["sampler"] == "pixelcnn" and metrics["sampler_param"] == "auto"
    assert 0 < metrics["pixelcnn_nll"] < torch.log(torch.tensor(16.0)).item() + 1
    assert tracking.client().get_run(ref["run_id"]).data.metrics["pixelcnn/pixelcnn_nll"] > 0
    assert generate(params)["sampler"] == "pixelcnn"
    images = __import__("numpy").load(project / "data/generated/images.npy")
    assert images.shape == (20, 28, 28) and 0 <= images.min() <= images.max() <= 1


@pytest.mark.slow
def test_interrupted_code_prior_resumes_to_the_same_sampler(project, tiny, monkeypatch):
    from bam_vae.errors import Interrupted
    from bam_vae.stages.fit_sampler import fit_sampler
    from bam_vae.stages.train import fit

    params = tiny(
        model={"arch": "vqvae", "channels": [8, 16], "vq": VQ_TINY}, train={"epochs": 1},
        generate={"pixelcnn": {**PIXELCNN_TINY, "epochs": 2}},
    )  # fmt: skip
    fit(params)
    expected = {k: v for k, v in fit_sampler(params).items() if k != "fit_seconds"}
    fitted = (project / "models/sampler.npz").read_bytes()

    calls = []
    forward = PixelCNN.forward

    def signalled_forward(self, codes):  # a real SIGINT on the prior's 3rd training step
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return forward(self, codes)

    monkeypatch.setattr(PixelCNN, "forward", signalled_forward)
    with pytest.raises(Interrupted, match=r"pixelcnn: interrupted at epoch 1, batch 3"):
        fit_sampler(params)
    monkeypatch.setattr(PixelCNN, "forward", forward)
    (checkpoint,) = (project / ".cache/checkpoints").glob("pixelcnn-*.pt")
    assert (project / "models/sampler.npz").read_bytes() == fitted  # untouched by the stop

    again = {k: v for k, v in fit_sampler(params).items() if k != "fit_seconds"}
    assert again == expected
    assert (project / "models/sampler.npz").read_bytes() == fitted
    assert not checkpoint.exists()
