"""``gmm``: a Gaussian mixture fitted to the posterior means (Ghosh et al. 2020).

Fitted by EM as scikit-learn's ``GaussianMixture`` fits it -- the same k-means
initialisation (scikit-learn's ``KMeans``, seeded), the same updates, regularisation and
stopping rule -- but vectorised over components in torch, in float64, on
``generate.device``: scikit-learn loops over the components in numpy, and its fit of the
default mixture takes most of a minute on two cores (``bench/sampler_fit.py`` prints both;
``tests/test_samplers.py`` checks that both reach the same mixture). Sampling is ours too,
from the saved weights, means and covariance factors, with the stage's torch generator. A
conditional model gets one mixture per class, so ``--class`` and balanced labels keep their
meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bam_vae.config import GmmConfig
from bam_vae.errors import BamError
from bam_vae.samplers.base import LatentSampler

TOL = 1e-3  # stop when the mean log-likelihood per point improves by less (scikit-learn's)
REG_COVAR = 1e-6  # added to each covariance's diagonal (scikit-learn's default)
CHUNK = 4096  # points per E-step block: bounds memory at CHUNK x components x dims


@dataclass
class Mixture:
    """A fitted mixture, float64 on the fitting device: ``weights`` (K), ``means`` (K x D),
    ``covariances`` (K x D x D for full, K x D for diag), and how the fit ended."""

    weights: Tensor
    means: Tensor
    covariances: Tensor
    lower_bound: float  # mean log-likelihood per point at the last EM step
    n_iter: int
    converged: bool

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-point log-likelihood (N) of points ``x`` (N x D, float64, same device)."""
        return torch.cat([_weighted_log_prob(c, self).logsumexp(1) for c in x.split(CHUNK)])


def _precisions(covariances: Tensor) -> tuple[Tensor, Tensor]:
    """(precision matrices, or inverse variances for diag; half their log-determinants)."""
    if covariances.dim() == 2:  # diag
        return 1.0 / covariances, -0.5 * covariances.log().sum(1)
    lower = torch.linalg.cholesky(covariances)
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    factor = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    return factor.mT @ factor, factor.diagonal(dim1=1, dim2=2).log().sum(1)


def _outer(x: Tensor) -> Tensor:
    """Each point's outer product, flattened: N x D^2."""
    return (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)


def _weighted_log_prob(x: Tensor, mix: Mixture, precisions=None) -> Tensor:
    """log w_k + log N(x | mu_k, Sigma_k): N x K.

    The Mahalanobis terms as x'Ax - 2 x'A mu + mu'A mu: three matrix products with N x K
    outputs instead of an N x K x D intermediate (the E-step's cost; exact to ~1e-12 in
    float64 at the latents' scales, tested against scikit-learn)."""
    a, half_log_det = precisions if precisions is not None else _precisions(mix.covariances)
    if a.dim() == 2:  # diag: A = diag(a)
        quad = (x * x) @ a.T
        a_mu = a * mix.means
    else:
        quad = _outer(x) @ a.flatten(1).T
        a_mu = (a @ mix.means.unsqueeze(2)).squeeze(2)
    sq = quad - 2 * x @ a_mu.T + (a_mu * mix.means).sum(1)
    dim = x.shape[1]
    return -0.5 * (dim * math.log(2 * math.pi) + sq) + half_log_det + mix.weights.log()


def _m_step(x: Tensor, resp: Tensor, full: bool, outer: Tensor | None = None):
    """Weights, means and covariances from responsibilities (N x K), as scikit-learn's
    (second moments as one matrix product over ``outer = _outer(x)``)."""
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = resp.T @ x / nk.unsqueeze(1)
    if full:
        dim = x.shape[1]
        second = (resp.T @ (_outer(x) if outer is None else outer)).view(-1, dim, dim)
        covariances = second / nk.view(-1, 1, 1) - means.unsqueeze(2) * means.unsqueeze(1)
        covariances += REG_COVAR * torch.eye(dim, dtype=x.dtype, device=x.device)
    else:
        covariances = resp.T @ (x * x) / nk.unsqueeze(1) - means.pow(2) + REG_COVAR
    return nk / nk.sum(), means, covariances


def fit_mixture(x: Tensor, components: int, covariance: str, max_iter: int, seed: int) -> Mixture:
    """EM for a Gaussian mixture on points ``x`` (N x D, float64, any device), as
    ``sklearn.mixture.GaussianMixture(components, covariance_type=covariance,
    max_iter=max_iter, reg_covar=1e-6, random_state=seed)`` fits it: k-means
    initialisation (scikit-learn's ``KMeans(n_init=1)``), EM until the mean log-likelihood
    per point improves by less than 1e-3."""
    from sklearn.cluster import KMeans  # the initialisation scikit-learn's mixture uses

    labels = KMeans(components, n_init=1, random_state=seed).fit(x.cpu().numpy()).labels_
    resp = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), components).to(x)
    full = covariance == "full"
    outer = _outer(x) if full else None
    mix = Mixture(*_m_step(x, resp, full, outer), -math.inf, n_iter=0, converged=False)
    for n_iter in range(1, max_iter + 1):
        previous = mix.lower_bound
        precisions = _precisions(mix.covariances)
        resp_parts, total = [], 0.0
        for chunk in x.split(CHUNK):
            weighted = _weighted_log_prob(chunk, mix, precisions)
            norm = weighted.logsumexp(1, keepdim=True)
            resp_parts.append((weighted - norm).exp())
            total += float(norm.sum())
        resp = torch.cat(resp_parts)
        mix = Mixture(*_m_step(x, resp, full, outer), total / len(x), n_iter, converged=False)
        if abs(mix.lower_bound - previous) < TOL:
            mix.converged = True
            break
    return mix


class GmmSampler(LatentSampler):
    config_type = GmmConfig
    kind = "gmm"

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: GmmConfig) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        # One mixture per group (class) -- a single group for unconditional models.
        self.weights = self.means = self.scales = np.zeros(0)

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def _fit(self, latents: Tensor, labels: Tensor | None) -> dict[str, float]:
        if self.cfg.components > self.cfg.max_points:
            raise BamError(
                f"generate.gmm.components: {self.cfg.components} is more than"
                f" generate.gmm.max_points ({self.cfg.max_points}); expected at most"
                f" {self.cfg.max_points}"
            )
        x = latents.numpy()
        groups = [x] if labels is None else [x[labels.numpy() == c] for c in range(self.n_classes)]
        rng = np.random.default_rng(self.cfg.seed)
        fitted, loglik, converged = [], 0.0, True
        for g, points in enumerate(groups):
            if len(points) < self.cfg.components:
                what = "latents" if labels is None else f"latents of class {g}"
                raise BamError(
                    f"generate.gmm.components: {self.cfg.components} is more than the"
                    f" {len(points)} {what}; expected at most {len(points)}"
                )
            subset = points
            if len(points) > self.cfg.max_points:
                subset = points[np.sort(rng.choice(len(points), self.cfg.max_points, False))]
            mix = fit_mixture(
                torch.from_numpy(subset).to(self.device), self.cfg.components,
                self.cfg.covariance, self.cfg.max_iter, self.cfg.seed,
            )  # fmt: skip
            fitted.append(mix)
            # On every latent, not the subset.
            loglik += float(mix.log_prob(torch.from_numpy(points).to(self.device)).mean()) * (
                len(points) / len(x)
            )
            converged &= mix.converged
        self.weights = np.stack([m.weights.cpu().numpy() for m in fitted])
        self.means = np.stack([m.means.cpu().numpy() for m in fitted])
        if self.cfg.covariance == "full":
            chol = [torch.linalg.cholesky(m.covariances).cpu().numpy() for m in fitted]
            self.scales = np.stack(chol)
        else:
            self.scales = np.stack([m.covariances.sqrt().cpu().numpy() for m in fitted])
        return {"gmm_loglik": float(loglik), "gmm_converged": float(converged)}

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        group = torch.zeros(n, dtype=torch.int64) if labels is None else labels.long()
        weights = torch.from_numpy(self.weights)
        # Component per draw: inverse CDF of the group's weights at one uniform per draw.
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        cdf = weights.cumsum(1)[group]
        comp = torch.searchsorted(cdf / cdf[:, -1:], u.unsqueeze(1)).squeeze(1)
        comp = comp.clamp_max(weights.shape[1] - 1)
        eps = torch.randn(n, self.means.shape[-1], generator=generator, dtype=torch.float64)
        means = torch.from_numpy(self.means)[group, comp]
        scales = torch.from_numpy(self.scales)[group, comp]
        if self.cfg.covariance == "full":
            return means + (scales @ eps.unsqueeze(-1)).squeeze(-1)
        return means + scales * eps

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "means": self.means, "scales": self.scales}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights, self.means, self.scales = arrays["weights"], arrays["means"], arrays["scales"]
