"""Memorisation scores, nearest neighbours and latent paths, on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from bam_vae.latent_paths import lerp, slerp, traversal
from bam_vae.scoring.memorisation import memorisation, nearest


@pytest.fixture(scope="module")
def images():
    """A train and a held-out set from one distribution (flattened 'images' in [0, 1])."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1, size=(10, 64))

    def draw(n):
        return np.clip(centres[rng.integers(10, size=n)] + rng.normal(0, 0.15, (n, 64)), 0, 1)

    return torch.as_tensor(draw(2000)), torch.as_tensor(draw(500)), torch.as_tensor(draw(500))


def test_nearest_agrees_with_scikit_learn(images):
    train, test, _ = images
    dist, index = nearest(test, train, k=5, chunk=128)
    ref_dist, ref_index = NearestNeighbors(n_neighbors=5).fit(train.numpy()).kneighbors(test)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-10)
    np.testing.assert_array_equal(index, ref_index)


def test_copies_of_training_images_are_caught_and_fresh_samples_are_not(images):
    train, test, fresh = images
    test_dist = nearest(test, train)[0][:, 0]
    fresh_scores = memorisation(nearest(fresh, train)[0][:, 0], test_dist)
    # Samples from the data distribution itself: as close as held-out images, by every score.
    assert 0.0 <= fresh_scores["copy_share"] <= 0.12
    assert 0.9 < fresh_scores["nn_ratio"] < 1.1 and abs(fresh_scores["mw_z"]) < 3
    # A generator returning training images with a little noise: copies, by every score.
    copies = train[:500] + 0.01 * torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    copied = memorisation(nearest(copies, train)[0][:, 0], test_dist)
    assert copied["copy_share"] == 1.0 and copied["nn_ratio"] < 0.2 and copied["mw_z"] < -20


def test_latent_paths_start_and_end_at_their_latents():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    for path in (lerp(a, b, 5), slerp(a, b, 5)):
        assert path.shape == (5, 3)
        torch.testing.assert_close(path[0], a)
        torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(lerp(a, b, 3)[1], (a + b) / 2)
    # Spherical: the norm goes linearly from |a| to |b|, the direction along the great circle.
    norms = slerp(a, b, 5).norm(dim=1)
    torch.testing.assert_close(norms, torch.linspace(3.0, 1.0, 5))
    mid = slerp(a, b, 3)[1]
    torch.testing.assert_close(mid / mid.norm(), torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)


def test_a_traversal_moves_one_dimension_at_a_time():
    centre, scale = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])
    rows = traversal(centre, [2, 0], scale, steps=3)
    expected = torch.tensor(
        [[1, 2, -3], [1, 2, 3], [1, 2, 9], [-0.5, 2, 3], [1, 2, 3], [2.5, 2, 3]]
    )
    torch.testing.assert_close(rows, expected.float())
