"""``gmm``: a Gaussian mixture fitted to the posterior means (Ghosh et al. 2020).

scikit-learn's EM fits it (k-means initialisation, seeded); sampling is ours, from the saved
weights, means and covariance factors, with the stage's torch generator. A conditional model
gets one mixture per digit, so ``--digit`` and balanced labels keep their meaning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import Tensor

from bam_vae.config import GmmConfig
from bam_vae.errors import BamError
from bam_vae.samplers.base import LatentSampler

N_CLASSES = 10


class GmmSampler(LatentSampler):
    config_type = GmmConfig
    kind = "gmm"

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: GmmConfig) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        # One mixture per group (digit) -- a single group for unconditional models.
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
        groups = [x] if labels is None else [x[labels.numpy() == d] for d in range(N_CLASSES)]
        rng = np.random.default_rng(self.cfg.seed)
        fitted, loglik, converged = [], 0.0, True
        for g, points in enumerate(groups):
            if len(points) < self.cfg.components:
                what = "latents" if labels is None else f"latents of digit {g}"
                raise BamError(
                    f"generate.gmm.components: {self.cfg.components} is more than the"
                    f" {len(points)} {what}; expected at most {len(points)}"
                )
            subset = points
            if len(points) > self.cfg.max_points:
                subset = points[np.sort(rng.choice(len(points), self.cfg.max_points, False))]
            gm = GaussianMixture(
                self.cfg.components, covariance_type=self.cfg.covariance,
                max_iter=self.cfg.max_iter, reg_covar=1e-6, random_state=self.cfg.seed,
            ).fit(subset)  # fmt: skip
            fitted.append(gm)
            loglik += gm.score(points) * len(points) / len(x)  # on every latent, not the subset
            converged &= bool(gm.converged_)
        self.weights = np.stack([gm.weights_ for gm in fitted])
        self.means = np.stack([gm.means_ for gm in fitted])
        if self.cfg.covariance == "full":
            self.scales = np.stack([np.linalg.cholesky(gm.covariances_) for gm in fitted])
        else:
            self.scales = np.stack([np.sqrt(gm.covariances_) for gm in fitted])
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
