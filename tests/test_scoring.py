"""FID, floor and KID behave as distances; precision/recall are the papers' definitions;
t-SNE embedding and noise images are as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bam_vae.config import FidConfig
from bam_vae.errors import BamError
from bam_vae.scoring.fid import fid, kid, load_generated, load_reference, precision_recall
from bam_vae.stages.tsne import embed


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    return rng.normal(size=(3000, 16)) @ mix


def test_fid_of_a_set_against_itself_is_zero(features):
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_as_samples_are_shifted(features):
    distances = [fid(features, features + shift) for shift in (0.0, 0.1, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)
    assert distances[-1] > 10 * distances[1] > 0


def test_fid_floor_of_a_real_subset_is_small_but_positive(features):
    subset = features[np.random.default_rng(1).choice(len(features), 1024, replace=False)]
    floor = fid(features, subset)
    assert 0 < floor < fid(features, features + 0.5)


def test_kid_is_unbiased_near_zero_for_same_distribution_and_positive_otherwise(features):
    rng = np.random.default_rng(2)
    other = rng.normal(size=features.shape) @ rng.normal(size=(16, 16))
    same_mean, _ = kid(features[:1500], features[1500:], 20, 500, seed=0)
    diff_mean, _ = kid(features, other, 20, 500, seed=0)
    assert abs(same_mean) < 0.1 * diff_mean
    assert diff_mean > 0


def _knn_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def test_precision_recall_density_coverage_are_the_papers_definitions(features):
    # Fixed features, the definitions written out by brute force: a sample is "precise" when it
    # lies in some real image's k-NN ball (Kynkäänniemi et al. 2019, k = 3); density counts the
    # balls, coverage the real images with a sample in theirs (Naeem et al. 2020, k = 5).
    rng = np.random.default_rng(3)
    real = features[:300]
    fake = features[300:500] * 1.3 + rng.normal(0, 0.5, size=(200, 16))
    cross = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # real x fake
    r3, f3, r5 = _knn_radius(real, 3), _knn_radius(fake, 3), _knn_radius(real, 5)
    expected = {
        "precision": (cross < r3[:, None]).any(0).mean(),
        "recall": (cross < f3[None, :]).any(1).mean(),
        "density": (cross < r5[:, None]).sum(0).mean() / 5,
        "coverage": (cross.min(1) < r5).mean(),
    }
    got = precision_recall(real, fake)
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    same = precision_recall(real, real)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = precision_recall(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize(
    ("z_dim", "method"), [(1, "1-D"), (2, "no projection"), (8, "t-SNE"), (64, "PCA")]
)
def test_embedding_by_latent_size(z_dim, method):
    z = np.random.default_rng(0).normal(size=(60, z_dim)).astype(np.float32)
    xy, how = embed(z, perplexity=10, seed=0)
    assert xy.shape == (60, 2)
    assert method in how
    again, _ = embed(z, perplexity=10, seed=0)
    np.testing.assert_allclose(xy, again)  # seeded: same picture every run


def test_missing_inputs_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(BamError, match="classifier.npy not found; run `bam fid-reference"):
        load_reference("classifier", ref_dir=tmp_path)
    with pytest.raises(BamError, match="images.npy not found; run `bam generate`"):
        load_generated(tmp_path / "images.npy")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5)))
    with pytest.raises(BamError, match=r"shape \(3, 5\), expected float \(N, 28, 28\)"):
        load_generated(bad)


def test_unknown_feature_space_is_rejected_by_params():
    with pytest.raises(Exception, match="classifier"):
        FidConfig(features=["vgg"])


def test_generation_is_seeded_and_labels_are_balanced():
    from bam_vae.config import GenerateConfig, ModelConfig
    from bam_vae.models import build_model
    from bam_vae.samplers import build_sampler, sample, sample_labels

    vae = build_model(ModelConfig(arch="dense", z_dim=3, hidden=[16, 8])).eval()
    prior = build_sampler(GenerateConfig(sampler="prior"), 3, False)
    assert torch.equal(sample(vae, prior, 6, 5, None), sample(vae, prior, 6, 5, None))
    assert not torch.equal(sample(vae, prior, 6, 5, None), sample(vae, prior, 6, 6, None))
    labels = sample_labels(1024, seed=0, label=None)
    assert torch.bincount(labels, minlength=10).tolist() == [103] * 4 + [102] * 6
    assert torch.equal(labels, sample_labels(1024, seed=0, label=None))
    assert set(sample_labels(8, seed=0, label=7).tolist()) == {7}


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_scikit_learns_with_and_without_ties(seed):
    from sklearn.metrics import roc_auc_score

    from bam_vae.scoring.ood import auroc

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("n", [1, 5, 12, 64])
def test_image_grid_matches_torchvision(n, tmp_path):
    from PIL import Image
    from torchvision.utils import make_grid as tv_grid
    from torchvision.utils import save_image

    from bam_vae.figures import image_grid, make_grid

    images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    for nrow, padding, pad in ((8, 2, 1.0), (3, 1, 0.0)):
        expected = tv_grid(images, nrow=nrow, padding=padding, pad_value=pad)
        assert torch.equal(make_grid(images, nrow, padding, pad), expected)
    image_grid(images, tmp_path / "ours.png", nrow=4)
    save_image(images, tmp_path / "tv.png", nrow=4, padding=1, pad_value=1.0, format="png")
    ours, theirs = (np.asarray(Image.open(tmp_path / f)) for f in ("ours.png", "tv.png"))
    assert np.array_equal(ours, theirs)


def test_frechet_distance_has_the_closed_form_of_diagonal_gaussians():
    from bam_vae.scoring.fid import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, 1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_equals_pytorch_fids_on_fixed_statistics():
    from pytorch_fid.fid_score import calculate_frechet_distance

    from bam_vae.scoring.fid import frechet_distance, stats

    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    fake = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    few = rng.normal(size=(10, 16))  # fewer points than dims: a singular covariance
    for a, b in ((real, fake), (real, few)):
        expected = calculate_frechet_distance(*stats(a), *stats(b))
        assert frechet_distance(*stats(a), *stats(b)) == pytest.approx(expected, rel=1e-9)
