"""``flow``: a normalising flow fitted to the posterior means (a neural spline flow, Durkan et
al. 2019, from the ``zuko`` library), a denser density than the mixture where the REC column
says the sampler, not the decoder, loses FID (docs/results.md).

The means are standardised, the flow is trained by maximum likelihood in the one training
loop (resumable), and new latents are the flow's inverse transform of u ~ N(0, I) drawn with
the caller's generator (so the same seed draws the same latents). Conditional models give it
the one-hot class as context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bam_vae.config import FlowConfig
from bam_vae.models.base import adam
from bam_vae.samplers.base import LatentSampler, tensor_digest
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key
from bam_vae.training.loop import Loop, fit


class FlowSampler(LatentSampler):
    config_type = FlowConfig
    kind = "flow"

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: FlowConfig) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        self.net: Any = None
        self.shift = self.scale = np.zeros(0)

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def _build(self, dim: int) -> Any:
        import zuko

        context = self.n_classes if self.conditional else 0
        return zuko.flows.NSF(features=dim, context=context, transforms=self.cfg.transforms,
                              hidden_features=[self.cfg.hidden] * 2)  # fmt: skip

    def _context(self, labels: Tensor | None) -> Tensor | None:
        return None if labels is None else F.one_hot(labels, self.n_classes).float()

    def _fit(self, latents: Tensor, labels: Tensor | None) -> dict[str, float]:
        # Standardised: the spline's domain is [-5, 5] with identity tails outside it.
        self.shift = latents.mean(0).numpy()
        self.scale = latents.std(0).clamp_min(1e-6).numpy()
        z = ((latents - latents.mean(0)) / torch.from_numpy(self.scale)).float()
        torch.manual_seed(self.cfg.seed)  # the flow's initial weights
        net = self._build(z.shape[1])
        optimizer = adam(net.parameters(), self.cfg.lr)
        context = self._context(labels)

        def step(idx: Tensor, epoch: int) -> dict[str, float]:
            c = None if context is None else context[idx]
            loss = -net(c).log_prob(z[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        key = config_key(self.config(), tensor_digest(z, labels))
        ckpt = Checkpoint(checkpoint_path(key, "flow"), net, [optimizer], "flow")
        loop = Loop("flow", len(z), self.cfg.batch_size, self.cfg.epochs, step, ckpt,
                    self.cfg.seed, lr_key=f"generate.flow.lr={self.cfg.lr}")  # fmt: skip
        with ckpt.owned():
            state = fit(loop)
            ckpt.remove()
        self.net = net.eval()
        # Per latent, in the standardised space: lower is a tighter fit.
        return {"flow_nll": state.history[-1]["train_loss"]}

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        assert self.net is not None, "fit or load the sampler first"
        u = torch.randn(n, len(self.shift), generator=generator)
        z = self.net(self._context(labels)).transform.inv(u).double()
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
