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

import torch.nn.functional as F
from torch import Tensor

from bam_vae.config import FlowConfig
from bam_vae.samplers.base import NetSampler


class FlowSampler(NetSampler):
    config_type = FlowConfig
    kind = "flow"

    def _build(self, dim: int) -> Any:
        import zuko

        context = self.n_classes if self.conditional else 0
        return zuko.flows.NSF(features=dim, context=context, transforms=self.cfg.transforms,
                              hidden_features=[self.cfg.hidden] * 2)  # fmt: skip

    def _context(self, labels: Tensor | None) -> Tensor | None:
        return None if labels is None else F.one_hot(labels, self.n_classes).float()

    def _loss(self, net: Any, z: Tensor, labels: Tensor | None) -> Tensor:
        # The spline's domain is [-5, 5] with identity tails: the latents come standardised.
        return -net(self._context(labels)).log_prob(z).mean()

    def _decode(self, u: Tensor, labels: Tensor | None) -> Tensor:
        return self.net(self._context(labels)).transform.inv(u)

    def _report(self, net: Any, history_row: dict[str, float]) -> dict[str, float]:
        # Per latent, in the standardised space: lower is a tighter fit.
        return {"flow_nll": history_row["train_loss"]}
