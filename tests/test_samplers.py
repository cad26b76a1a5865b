"""Latent samplers: what they recover, that they repeat, how they are saved, what they refuse."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bam_vae.config import ConfigError, GenerateConfig, parse_params
from bam_vae.errors import BamError
from bam_vae.samplers import build_sampler, load_sampler
from bam_vae.samplers.base import read_file

MEANS = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])


def mixture_draws(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=WEIGHTS)
    return torch.from_numpy(MEANS[comp] + rng.normal(0, 0.5, size=(n, 2))).float()


def config(sampler: str, **section) -> GenerateConfig:
    raw = {"sampler": sampler}
    if section:
        raw[sampler.replace("-", "_")] = section
    return GenerateConfig.model_validate(raw)


@pytest.mark.parametrize("max_points", [30_000, 1500], ids=["all", "subset"])
def test_gmm_recovers_the_means_and_weights_of_a_known_mixture(max_points):
    sampler = build_sampler(config("gmm", components=3, max_points=max_points), 2, False)
    sampler.fit(mixture_draws(6000))
    order = np.argsort(sampler.means[0][:, 0] + 0.1 * sampler.means[0][:, 1])
    np.testing.assert_allclose(sampler.means[0][order], MEANS[[0, 2, 1]], atol=0.1)
    np.testing.assert_allclose(sampler.weights[0][order], WEIGHTS[[0, 2, 1]], atol=0.02)
    # Its draws have the same weights again: count those near each true mean.
    z = sampler.sample(20000, torch.Generator().manual_seed(1)).numpy()
    nearest = np.argmin(((z[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest) / len(z), WEIGHTS, atol=0.02)


def test_conditional_gmm_draws_from_the_mixture_of_the_asked_digit():
    centres = torch.arange(10).float().unsqueeze(1) * torch.tensor([[3.0, -2.0]])
    labels = torch.arange(2000) % 10
    latents = centres[labels] + 0.1 * torch.randn(
        2000, 2, generator=torch.Generator().manual_seed(0)
    )
    sampler = build_sampler(config("gmm", components=2), 2, True)
    sampler.fit(latents, labels)
    asked = torch.full((500,), 7)
    z = sampler.sample(500, torch.Generator().manual_seed(0), asked)
    assert torch.linalg.norm(z - centres[7], dim=1).max() < 1.0
    with pytest.raises(BamError, match="needs the classes"):
        sampler.sample(5, torch.Generator())


SMALL = {"gmm": {"components": 3}, "two-stage": {"epochs": 3, "hidden": 16},
         "flow": {"epochs": 2, "hidden": 16, "transforms": 2}}  # fmt: skip


@pytest.mark.filterwarnings("error")  # stage output stays free of warnings
@pytest.mark.parametrize("kind", ["gmm", "two-stage", "flow"])
def test_same_seed_same_fit_and_same_samples(kind):
    section = SMALL[kind]
    draws = []
    for _ in range(2):
        sampler = build_sampler(config(kind, **section), 2, False)
        sampler.fit(mixture_draws(1000))
        draws.append(sampler.sample(64, torch.Generator().manual_seed(5)))
    assert draws[0].shape == (64, 2) and draws[0].dtype == torch.float32
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    other = sampler.sample(64, torch.Generator().manual_seed(6))
    assert not torch.equal(draws[0], other)


def test_two_stage_learns_the_latent_distribution_better_than_the_prior():
    latents = mixture_draws(4000)
    sampler = build_sampler(config("two-stage", epochs=40, hidden=64), 2, False)
    info = sampler.fit(latents)
    z = sampler.sample(4000, torch.Generator().manual_seed(0)).numpy()
    nearest = np.min(((z[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    # Most draws land on one of the three blobs (N(0, I) would land ~none there); a VAE maps
    # its connected prior onto the blobs with some draws in between.
    assert np.mean(nearest < 2.0**2) > 0.6, info


@pytest.mark.slow
def test_the_flow_puts_its_draws_on_the_blobs_and_is_its_own_likelihood():
    """zuko's spline flow, fitted by maximum likelihood: draws land on the known mixture's
    blobs, and its per-latent NLL nears the mixture's own entropy in the standardised
    space (a flow that fits it well is within a fraction of a nat)."""
    latents = mixture_draws(4000)
    sampler = build_sampler(config("flow", epochs=40, hidden=64), 2, False)
    info = sampler.fit(latents)
    z = sampler.sample(4000, torch.Generator().manual_seed(0)).numpy()
    nearest = np.min(((z[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest < 1.5**2) > 0.9, info


@pytest.mark.slow
def test_a_conditional_flow_draws_the_asked_class():
    centres = torch.arange(10).float().unsqueeze(1) * torch.tensor([[3.0, -2.0]])
    labels = torch.arange(3000) % 10
    latents = centres[labels] + 0.1 * torch.randn(
        3000, 2, generator=torch.Generator().manual_seed(0)
    )
    sampler = build_sampler(config("flow", epochs=30, hidden=64), 2, True)
    sampler.fit(latents, labels)
    z = sampler.sample(500, torch.Generator().manual_seed(0), torch.full((500,), 7))
    assert torch.linalg.norm(z - centres[7], dim=1).median() < 1.0


def test_big_latents_are_fitted_in_a_pca_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(300, 2)))[0]  # 2-D data embedded in 300 dims
    latents = torch.from_numpy(mixture_draws(3000).numpy() @ basis.T).float()
    sampler = build_sampler(
        GenerateConfig.model_validate({"sampler": "gmm", "max_dim": 4, "gmm": {"components": 3}}),
        300, False,
    )  # fmt: skip
    info = sampler.fit(latents)
    assert info["pca_explained_variance"] > 0.999
    z = sampler.sample(100, torch.Generator().manual_seed(0))
    assert z.shape == (100, 300)
    back = z.numpy() @ basis  # coordinates in the true plane: near the true means
    assert np.min(((back[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1).mean() < 1.0


@pytest.mark.parametrize("kind", ["gmm", "two-stage", "flow"])
def test_a_saved_sampler_loads_without_pickle_and_draws_the_same(kind, tmp_path, monkeypatch):
    section = SMALL[kind]
    sampler = build_sampler(config(kind, **section), 2, False)
    sampler.fit(mixture_draws(500))
    path = tmp_path / "sampler.npz"
    sampler.save(path, model_sha256="ab" * 32)
    with np.load(path, allow_pickle=False) as blob:  # raises on any pickled object
        assert all(blob[k].dtype != object for k in blob.files)
    again = tmp_path / "again.npz"
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # saved "years later"
    sampler.save(again, model_sha256="ab" * 32)
    assert again.read_bytes() == path.read_bytes()  # byte-identical: one DVC hash per fit
    loaded = load_sampler(path, kind, "ab" * 32)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(loaded.sample(50, gen()), sampler.sample(50, gen()), rtol=0, atol=0)


def test_sampler_file_of_another_model_or_kind_is_refused(tmp_path):
    sampler = build_sampler(config("gmm", components=2), 2, False)
    sampler.fit(mixture_draws(200))
    path = tmp_path / "sampler.npz"
    sampler.save(path, model_sha256="ab" * 32)
    with pytest.raises(BamError, match="fitted to another model .*run `bam fit-sampler`"):
        load_sampler(path, "gmm", "cd" * 32)
    with pytest.raises(BamError, match="holds a 'gmm' sampler, generate.sampler asks for 'two-st"):
        load_sampler(path, "two-stage", "ab" * 32)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BamError, match=f"corrupt sampler file {path}"):
        read_file(path)


def test_a_pickled_sampler_file_is_refused_without_running_it(tmp_path):
    path = tmp_path / "sampler.npz"
    marker = tmp_path / "ran"
    # An object array whose unpickling would create ``marker``.
    code = (
        "import numpy as np\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (open, ({str(marker)!r}, 'w'))\n"
        f"np.savez({str(path)!r}, meta=np.array([Evil()], dtype=object))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(BamError, match="corrupt sampler file"):
        read_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sampler": "glow"}, "generate.sampler: 'glow' is not allowed; expected one of"),
        ({"flow": {"transforms": 0}}, "generate.flow.transforms: 0 is not allowed"),
        ({"gmm": {"components": 0}}, "generate.gmm.components: 0 is not allowed"),
        ({"gmm": {"covariance": "tied"}}, "generate.gmm.covariance: 'tied' is not allowed"),
        ({"two_stage": {"epochs": 0}}, "generate.two_stage.epochs: 0 is not allowed"),
    ],
)
def test_bad_sampler_params_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_params({"generate": override})
    assert "\n" not in str(info.value)


def test_a_sampler_refuses_latents_it_cannot_fit():
    with pytest.raises(BamError, match="'gmm' fits continuous latents.*codes; expected auto or"
                       " one of prior, pixelcnn"):  # fmt: skip
        build_sampler(config("gmm"), 784, False, "codes")
    with pytest.raises(BamError, match="'pixelcnn' fits codes latents"):
        build_sampler(config("pixelcnn"), 2, False)


@pytest.mark.parametrize(("latent_kind", "kind"), [("continuous", "gmm"), ("codes", "pixelcnn")])
def test_auto_resolves_to_the_default_of_the_models_latents(latent_kind, kind):
    assert build_sampler(config("auto"), 784, False, latent_kind).kind == kind


def test_more_components_than_latents_is_refused():
    sampler = build_sampler(config("gmm", components=10), 2, True)
    labels = torch.tensor([0] * 30 + [1] * 5 + list(range(2, 10)) * 20)
    with pytest.raises(BamError, match="components: 10 is more than the 5 latents of class 1"):
        sampler.fit(torch.randn(len(labels), 2), labels)


def test_more_components_than_max_points_is_refused():
    sampler = build_sampler(config("gmm", components=10, max_points=5), 2, False)
    with pytest.raises(BamError, match=r"components: 10 is more than generate.gmm.max_points"):
        sampler.fit(mixture_draws(200))


def test_meta_records_kind_model_and_config(tmp_path):
    sampler = build_sampler(config("gmm", components=2, covariance="diag"), 2, False)
    sampler.fit(mixture_draws(200))
    sampler.save(tmp_path / "s.npz", model_sha256="ef" * 32)
    meta, arrays = read_file(tmp_path / "s.npz")
    assert meta["kind"] == "gmm" and meta["model_sha256"] == "ef" * 32
    assert meta["config"]["covariance"] == "diag" and arrays["scales"].shape == (1, 2, 2)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_reaches_scikit_learns_mixture(covariance):
    """Same initialisation, updates and stopping rule as sklearn's GaussianMixture: the same
    mixture, to float64 rounding, on a mixture with overlapping, correlated components."""
    from sklearn.mixture import GaussianMixture

    from bam_vae.samplers.gmm import fit_mixture

    rng = np.random.default_rng(3)
    centres = rng.normal(0, 2.5, size=(6, 4))
    mixing = rng.normal(size=(6, 4, 4)) * 0.4
    comp = rng.choice(6, size=4000, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    x = centres[comp] + np.einsum("nde,ne->nd", mixing[comp], rng.normal(size=(4000, 4)))
    ours = fit_mixture(torch.from_numpy(x), 8, covariance, 200, seed=0)
    theirs = GaussianMixture(8, covariance_type=covariance, max_iter=200, reg_covar=1e-6,
                             random_state=0).fit(x)  # fmt: skip
    assert ours.n_iter == theirs.n_iter_ and ours.converged == theirs.converged_
    assert ours.lower_bound == pytest.approx(theirs.lower_bound_, abs=1e-9)
    np.testing.assert_allclose(ours.weights.numpy(), theirs.weights_, atol=1e-8)
    np.testing.assert_allclose(ours.means.numpy(), theirs.means_, atol=1e-7)
    np.testing.assert_allclose(ours.covariances.numpy(), theirs.covariances_, atol=1e-7)
    loglik = ours.log_prob(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(loglik, theirs.score_samples(x), atol=1e-8)
