"""The conditional VAE: labels in encoder and decoder, training, the registered generator."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bam_vae.config import ModelConfig, TrainConfig
from bam_vae.models import build_model
from bam_vae.models.cvae import CVAE
from bam_vae.models.saved import load_model
from bam_vae.scoring.evaluator import label_accuracy


def small(z_dim: int = 4) -> CVAE:
    torch.manual_seed(0)
    return CVAE(z_dim, [8, 16]).eval()


@pytest.mark.parametrize("z_dim", [1, 16])
def test_forward_and_loss_shapes(z_dim):
    model = small(z_dim)
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    out = model(x, y)
    assert out.logits.shape == (5, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (5, z_dim)
    per_image = model.loss_per_image(out, x, TrainConfig())
    assert per_image.total.shape == per_image.recon.shape == per_image.kl.shape == (5,)
    parts = model.loss(out, x, TrainConfig())
    assert parts.total.shape == () and parts.total.item() > 0
    assert model.latent(x, y).shape == (5, z_dim)
    assert model.reconstruct(x, y).shape == (5, 1, 28, 28)


def test_registry_builds_a_conditional_model():
    model = build_model(ModelConfig(arch="cvae", z_dim=16, channels=[32, 64]))
    assert isinstance(model, CVAE) and model.conditional


def test_labels_are_required():
    model = small()
    with pytest.raises(ValueError, match="labels"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="labels"):
        model.decode(torch.zeros(2, 4))


@torch.no_grad()
def test_the_label_changes_the_image_for_the_same_z():
    model = small()
    z = torch.randn(1, 4).repeat(10, 1)
    images = torch.sigmoid(model.decode(z, torch.arange(10)))
    for d in range(1, 10):
        assert not torch.allclose(images[0], images[d]), d


@torch.no_grad()
def test_sample_follows_the_given_or_balanced_labels():
    model = small()
    y = torch.tensor([3, 3, 7])
    images = model.sample(3, torch.Generator().manual_seed(0), y)
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, torch.sigmoid(model.decode(z, y)))
    # Without labels: 0, 1, ..., 9, 0, 1 for n = 12.
    balanced = model.sample(12, torch.Generator().manual_seed(1), None)
    z = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(balanced, torch.sigmoid(model.decode(z, torch.arange(12) % 10)))


def test_label_accuracy_on_hand_made_probabilities():
    probs = np.full((4, 10), 0.01)
    probs[[0, 1, 2, 3], [3, 3, 7, 0]] = 0.91  # argmax: 3, 3, 7, 0
    assert label_accuracy(probs, np.array([3, 3, 7, 1])) == pytest.approx(0.75)
    assert label_accuracy(probs, np.array([3, 3, 7, 0])) == 1.0


@pytest.mark.slow
def test_one_epoch_trains_and_registers_a_pyfunc_generator(project, tiny):
    from bam_vae.stages.train import fit

    final = fit(tiny(model={"arch": "cvae", "z_dim": 4, "channels": [8, 16]}, train={"epochs": 1}))
    assert np.isfinite(final["test_loss"]) and final["n_parameters"] > 0
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert ref["model_name"] == "bam-vae-cvae" and ref["model_version"] == "1"

    generator = mlflow.pyfunc.load_model("models:/bam-vae-cvae/1")
    vae, _ = load_model(project / "models/vae.pt")
    z = torch.randn(7, 4)
    with torch.no_grad():
        expected = torch.sigmoid(vae.decode(z, torch.full((7,), 3)))[:, 0].numpy()
    got = generator.predict(pd.DataFrame({"latents": [z.tolist()], "digit": [3]}))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Drawn from its prior, one digit asked for: the classifier is not needed to see the shape.
    assert generator.predict(pd.DataFrame({"n": [5], "seed": [0], "digit": [7]})).shape == (
        5, 28, 28)  # fmt: skip


@pytest.mark.slow
def test_a_cvae_of_another_dataset_conditions_on_its_classes(project, tiny_mnist, tmp_path):
    """Three classes with names: the model, its file and its registered generator follow them;
    the generator takes ``class`` (index or name), and ``digit`` only for MNIST."""
    from mlflow.exceptions import MlflowException

    from bam_vae.config import parse_params
    from bam_vae.stages.train import fit

    data = tmp_path / "three"
    data.mkdir()
    for split in ("train", "test"):
        blob = torch.load(tiny_mnist / f"{split}.pt", weights_only=True)
        keep = blob["labels"] < 3
        torch.save({k: v[keep].clone() for k, v in blob.items()}, data / f"{split}.pt")
    (data / "dataset.json").write_text(
        json.dumps({"name": "abc", "classes": ["zero", "one", "two"], "labelled": True})
    )
    params = parse_params({"data": {"out_dir": str(data)},
                           "model": {"arch": "cvae", "z_dim": 4, "channels": [8, 16]},
                           "train": {"epochs": 1, "batch_size": 64, "threads": 1}})  # fmt: skip
    fit(params)
    vae, _ = load_model(project / "models/vae.pt")
    assert vae.n_classes == 3 and vae.posterior.in_features == 16 * 7 * 7 + 3
    generator = mlflow.pyfunc.load_model("models:/bam-vae-abc-cvae/1")
    by_name = generator.predict(pd.DataFrame({"n": [4], "seed": [0], "class": ["two"]}))
    by_index = generator.predict(pd.DataFrame({"n": [4], "seed": [0], "class": [2]}))
    np.testing.assert_array_equal(by_name, by_index)
    for row, message in (
        ({"class": [3]}, "class: 3 is not allowed; expected an integer from 0 to 2"),
        ({"class": ["seven"]}, "class: 'seven' is not a class; expected an index or one of zero"),
        ({"digit": [1]}, "digit: only for MNIST; this abc model takes class"),
    ):
        with pytest.raises(MlflowException, match=message):
            generator.predict(pd.DataFrame({"n": [2], "seed": [0], **row}))
