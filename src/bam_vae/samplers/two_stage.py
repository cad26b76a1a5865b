"""``two-stage``: a second, small VAE fitted to the posterior means (Dai & Wipf 2019).

The first VAE's aggregate posterior q(z) is not N(0, I); a second VAE u -> z learns it, and
new latents are drawn as z = decoder(u), u ~ N(0, I). As in the paper, its decoder is a
Gaussian with a learned variance gamma (which lets it fit q(z) sharply), and u has the size of
z. Conditional models give it the class as a one-hot input on both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam_vae.config import TwoStageConfig
from bam_vae.models.base import adam, kl_per_image, reparameterize
from bam_vae.samplers.base import LatentSampler, tensor_digest
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key
from bam_vae.training.loop import Loop, fit


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out),
    )  # fmt: skip


class SecondStage(nn.Module):
    def __init__(self, dim: int, hidden: int, n_labels: int) -> None:
        super().__init__()
        self.n_labels = n_labels
        self.encoder = mlp(dim + n_labels, hidden, 2 * dim)
        self.decoder = mlp(dim + n_labels, hidden, dim)
        self.log_gamma = nn.Parameter(torch.zeros(()))  # gamma = 1 at the start, as in the paper

    def _with(self, v: Tensor, labels: Tensor | None) -> Tensor:
        if not self.n_labels:
            return v
        return torch.cat([v, F.one_hot(labels, self.n_labels).to(v)], dim=1)

    def loss(self, z: Tensor, labels: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Negative ELBO per latent, averaged: Gaussian NLL with variance gamma, plus KL."""
        mu, logvar = self.encoder(self._with(z, labels)).chunk(2, dim=1)
        u = reparameterize(mu, logvar, generator)
        err = (self.decoder(self._with(u, labels)) - z).pow(2).sum(1)
        nll = 0.5 * (err / self.log_gamma.exp() + z.shape[1] * self.log_gamma)
        return (nll + kl_per_image(mu, logvar)).mean()

    def decode(self, u: Tensor, labels: Tensor | None) -> Tensor:
        return self.decoder(self._with(u, labels))


class TwoStageSampler(LatentSampler):
    config_type = TwoStageConfig
    kind = "two-stage"

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: TwoStageConfig) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        self.net: SecondStage | None = None
        self.shift = self.scale = np.zeros(0)

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def _build(self, dim: int) -> SecondStage:
        return SecondStage(dim, self.cfg.hidden, self.n_classes if self.conditional else 0)

    def _fit(self, latents: Tensor, labels: Tensor | None) -> dict[str, float]:
        # Standardised inputs: the same learning rate works for any latent scale.
        self.shift = latents.mean(0).numpy()
        self.scale = latents.std(0).clamp_min(1e-6).numpy()
        z = ((latents - latents.mean(0)) / torch.from_numpy(self.scale)).float()
        torch.manual_seed(self.cfg.seed)  # the net's initial weights and the posterior noise
        net = self._build(z.shape[1])
        optimizer = adam(net.parameters(), self.cfg.lr)

        def step(idx: Tensor, epoch: int) -> dict[str, float]:
            loss = net.loss(z[idx], None if labels is None else labels[idx], None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        key = config_key(self.config(), tensor_digest(z, labels))
        ckpt = Checkpoint(checkpoint_path(key, "two-stage"), net, [optimizer], "two-stage")
        loop = Loop("two-stage", len(z), self.cfg.batch_size, self.cfg.epochs, step, ckpt,
                    self.cfg.seed, lr_key=f"generate.two_stage.lr={self.cfg.lr}")  # fmt: skip
        with ckpt.owned():
            state = fit(loop)
            ckpt.remove()
        self.net = net.eval()
        gamma = net.log_gamma.detach().exp().item()
        return {"two_stage_loss": state.history[-1]["train_loss"], "two_stage_gamma": gamma}

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        assert self.net is not None, "fit or load the sampler first"
        u = torch.randn(n, len(self.shift), generator=generator)
        z = self.net.decode(u, labels).double()
        return z * torch.from_numpy(self.scale) + torch.from_numpy(self.shift)

    def arrays(self) -> dict[str, np.ndarray]:
        assert self.net is not None
        state = {f"net.{k}": v.numpy() for k, v in self.net.state_dict().items()}
        return state | {"shift": self.shift, "scale": self.scale}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.shift, self.scale = arrays["shift"], arrays["scale"]
        self.net = self._build(len(self.shift)).eval()
        state = {k[4:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("net.")}
        self.net.load_state_dict(state)
