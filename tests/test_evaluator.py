"""The scoring classifier: class metrics, shapes, a tiny training run and its errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny
from pydantic import ValidationError

from bam_vae.datasets import load_split
from bam_vae.errors import BamError, Interrupted
from bam_vae.scoring import evaluator as ev
from bam_vae.scoring.fid import fid
from bam_vae.stages import train_evaluator as ev_stage

TINY = ev_stage.EvaluatorConfig(epochs=2, batch_size=64, feature_dim=16, device="cpu")


def _one_hot(digits) -> np.ndarray:
    return np.eye(10)[np.asarray(digits)]


# ---------------------------------------------------------------------------- pure metrics
def test_balanced_one_hot_is_perfectly_even_and_confident():
    m = ev.class_metrics(_one_hot(np.tile(np.arange(10), 3)))
    assert m["class_histogram"] == pytest.approx([0.1] * 10)
    assert m["class_entropy"] == pytest.approx(1.0)
    assert m["confident_share"] == 1.0


def test_single_digit_has_zero_entropy():
    m = ev.class_metrics(_one_hot([7] * 5))
    assert m["class_histogram"] == [0.0] * 7 + [1.0, 0.0, 0.0]
    assert m["class_entropy"] == 0.0
    assert json.dumps(m["class_entropy"]) == "0.0"  # not -0.0 in the metrics file


def test_low_confidence_rows():
    unsure = np.full(10, 0.1)
    mostly_two = np.array([0.0, 0.0, 0.95] + [0.05 / 7] * 7)
    probs = np.stack([unsure, mostly_two, mostly_two, unsure])
    m = ev.class_metrics(probs)
    assert m["confident_share"] == 0.5
    assert sum(m["class_histogram"]) == pytest.approx(1.0)
    assert ev.class_metrics(probs, threshold=0.05)["confident_share"] == 1.0


def test_label_accuracy():
    probs = _one_hot([0, 1, 2, 3])
    assert ev.label_accuracy(probs, np.array([0, 1, 2, 9])) == 0.75


def test_bad_probability_shape():
    with pytest.raises(ValueError, match=r"N>0, K>=2"):
        ev.class_metrics(np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"N>0, K>=2"):
        ev.class_metrics(np.ones(9) / 9)


def test_class_metrics_follow_the_class_count():
    m = ev.class_metrics(np.eye(47)[np.arange(94) % 47])  # EMNIST balanced: 47 classes
    assert len(m["class_histogram"]) == 47 and m["class_entropy"] == pytest.approx(1.0)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValidationError):
        ev_stage.EvaluatorConfig(epoch=3)
    with pytest.raises(ValidationError):
        ev_stage.EvaluatorConfig(feature_dim=4)


# ---------------------------------------------------------------------------- model
def test_shapes_and_predict():
    torch.manual_seed(0)
    model = ev.Evaluator(feature_dim=16).eval()
    x = torch.rand(5, 1, 28, 28)
    feats = model.features(x)
    assert feats.shape == (5, 16) and (feats >= 0).all()
    assert model(x).shape == (5, 10)

    f, p = ev.predict(model, x[:, 0], batch_size=2)  # N x 28 x 28 works too
    assert f.shape == (5, 16) and p.shape == (5, 10)
    assert f.dtype == p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(f, feats.detach().double().numpy(), atol=1e-6)


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def small_data(mnist_dir, tmp_path_factory) -> Path:
    # 2000 images: a couple of seconds of training lands well above chance.
    return write_tiny(mnist_dir, tmp_path_factory.mktemp("mnist_small"), 2000, 500)


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluator")
    metrics = ev_stage.train_evaluator(TINY, small_data, out / "m" / "ev.pt", out / "ev.json")
    return out, metrics


@pytest.mark.slow
def test_train_writes_model_and_metrics(trained, small_data):
    out, metrics = trained
    assert json.loads((out / "ev.json").read_text()) == metrics
    assert set(metrics) == {"test_accuracy", "test_loss", "epochs", "n_parameters", "dataset",
                            "n_classes"}  # fmt: skip
    assert metrics["dataset"] == "mnist" and metrics["n_classes"] == 10
    assert metrics["epochs"] == 2 and metrics["test_accuracy"] > 0.8
    assert not list(out.rglob("*.tmp"))

    blob = torch.load(out / "m" / "ev.pt", weights_only=True)
    assert blob["config"] == TINY.model_dump() | {"classes": list("0123456789")}
    model = ev.load_evaluator(out / "m" / "ev.pt")
    assert not model.training
    # The reloaded model scores the test split exactly as training reported.
    test = torch.load(small_data / "test.pt", weights_only=True)
    _, probs = ev.predict(model, test["images"].float() / 255)
    assert ev.label_accuracy(probs, test["labels"].numpy()) == metrics["test_accuracy"]


@pytest.mark.slow
def test_train_is_deterministic(trained, small_data, tmp_path):
    _, first = trained
    again = ev_stage.train_evaluator(TINY, small_data, tmp_path / "ev.pt", tmp_path / "ev.json")
    assert again == first


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_classifier(trained, small_data, project):
    out, expected = trained

    def send_sigint(step):  # a real signal, in the middle of the first epoch
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    model, metrics = project / "ev.pt", project / "ev.json"
    with pytest.raises(Interrupted, match="run again with the same params to resume"):
        ev_stage.train_evaluator(TINY, small_data, model, metrics, on_batch=send_sigint)
    assert not model.exists() and not metrics.exists()  # nothing half-written
    (ckpt,) = (project / ".cache/checkpoints").glob("evaluator-*.pt")

    assert ev_stage.train_evaluator(TINY, small_data, model, metrics) == expected
    resumed = torch.load(model, weights_only=True)["state_dict"]
    for key, value in torch.load(out / "m" / "ev.pt", weights_only=True)["state_dict"].items():
        assert torch.equal(resumed[key], value), key
    assert not ckpt.exists()  # consumed


def test_missing_and_corrupt_model_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(BamError, match="bam train-evaluator") as err:
        ev.load_evaluator(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(BamError, match="corrupt evaluator file") as err:
        ev.load_evaluator(corrupt)
    assert str(corrupt) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def default_evaluator(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluator")
    metrics = ev_stage.train_evaluator(
        ev_stage.EvaluatorConfig(device="cpu"), mnist_dir, out / "ev.pt", out / "ev.json"
    )
    return ev.load_evaluator(out / "ev.pt"), metrics


@pytest.mark.e2e
@pytest.mark.slow
def test_default_evaluator_reaches_99_percent(default_evaluator):
    assert default_evaluator[1]["test_accuracy"] >= 0.99


@pytest.mark.e2e
@pytest.mark.slow
def test_class_metrics_of_real_test_images(default_evaluator, mnist_dir):
    images, _ = load_split(mnist_dir, "test")
    _, probs = ev.predict(default_evaluator[0], images.float().div(255).unsqueeze(1))
    metrics = ev.class_metrics(probs)
    assert metrics["class_entropy"] == pytest.approx(1.0, abs=0.01)
    assert metrics["confident_share"] >= 0.95


@pytest.mark.e2e
@pytest.mark.slow
def test_real_vs_real_floor_is_below_fid_of_noise(default_evaluator, mnist_dir):
    images, _ = load_split(mnist_dir, "test")
    real, _ = ev.predict(default_evaluator[0], images.float().div(255).unsqueeze(1))
    subset = real[np.random.default_rng(0).choice(len(real), 1024, replace=False)]
    noise = torch.rand(1024, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noise_feats, _ = ev.predict(default_evaluator[0], noise)
    floor = fid(real, subset)
    assert 0 < floor < fid(real, noise_feats) / 10
