"""``pixelcnn``: the VQ-VAE's learned code prior (van den Oord et al. 2016; 2017, section 3.2).

An autoregressive network over the 7 x 7 grid of code indices, fitted by stage
``fit-sampler`` to the codes of the training images under the trained VQ-VAE (so changing
the sampler never retrains the VQ-VAE). New latents: a grid drawn one position at a time in
raster order, each code from the network's softmax given the codes before it, then looked up
in a copy of the model's codebook (saved with the sampler) and flattened as ``VQVAE.decode``
takes it. Fitting runs in the one training loop: interruptible and resumable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam_vae.config import PixelCnnConfig
from bam_vae.models.base import adam
from bam_vae.models.vqvae import GRID
from bam_vae.samplers.base import LatentSampler, tensor_digest
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key
from bam_vae.training.loop import Loop, fit

if TYPE_CHECKING:
    from bam_vae.models import VAE


class MaskedConv2d(nn.Conv2d):
    """Convolution that sees only earlier positions in raster order (type A) or also the
    current one (type B, for layers after the first, whose input at a position already
    summarises only earlier positions)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, kind: str):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)
        c = kernel // 2
        mask[:, :, c, c + (kind == "B") :] = 0
        mask[:, :, c + 1 :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class PixelCNN(nn.Module):
    """Autoregressive prior over a grid of codes: (N, 7, 7) int64 -> logits (N, K, 7, 7)."""

    def __init__(self, n_codes: int, channels: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(n_codes, channels)
        self.first = MaskedConv2d(channels, channels, 5, "A")
        self.blocks = nn.ModuleList(
            MaskedConv2d(channels, channels, 3, "B") for _ in range(layers - 1)
        )
        self.head = nn.Conv2d(channels, n_codes, 1)

    def forward(self, codes: Tensor) -> Tensor:
        h = self.first(self.embed(codes).permute(0, 3, 1, 2))
        for block in self.blocks:
            h = h + block(F.relu(h))  # residual: keeps a deep stack easy to train
        return self.head(F.relu(h))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        codes = torch.zeros(n, GRID, GRID, dtype=torch.int64, device=device)
        for r in range(GRID):
            for c in range(GRID):
                probs = torch.softmax(self(codes)[:, :, r, c], dim=1)
                drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator)
                codes[:, r, c] = drawn.squeeze(1).to(device)
        return codes


class PixelCnnSampler(LatentSampler):
    kind = "pixelcnn"
    fits = ("codes",)
    config_type = PixelCnnConfig

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: PixelCnnConfig) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        self.net: PixelCNN | None = None
        self.codebook = np.zeros((0, 0), dtype=np.float32)  # n_codes x code_dim

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    @torch.no_grad()
    def encode(self, vae: VAE, images: Tensor, labels: Tensor, batch: int = 1000) -> Tensor:
        """Code grids (int64, N x 7 x 7, on the CPU) of the training images; keeps a copy of
        the model's codebook and fits on the model's device."""
        self.codebook = vae.quantizer.codebook.detach().cpu().numpy().copy()
        self.device = vae.device
        x = images.to(vae.device)
        grids = [
            vae.codes(x[i : i + batch].float().div(255.0).unsqueeze(1))
            for i in range(0, len(x), batch)
        ]
        return torch.cat(grids).cpu()

    def fit(self, latents: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Fit to code grids (``encode``'s output); returns the mean negative log-likelihood
        per code, in nats, on all of them."""
        codes = latents.long().to(self.device)
        torch.manual_seed(self.cfg.seed)
        net = PixelCNN(len(self.codebook), self.cfg.channels, self.cfg.layers).to(self.device)
        optimizer = adam(net.parameters(), self.cfg.lr)

        def step(idx: Tensor, epoch: int) -> dict[str, float]:
            batch = codes[idx]
            loss = F.cross_entropy(net(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        key = config_key(self.config(), tensor_digest(latents, torch.from_numpy(self.codebook)))
        ckpt = Checkpoint(checkpoint_path(key, "pixelcnn"), net, [optimizer], "pixelcnn")
        loop = Loop("pixelcnn", len(codes), self.cfg.batch_size, self.cfg.epochs, step, ckpt,
                    self.cfg.seed, lr_key=f"generate.pixelcnn.lr={self.cfg.lr}")  # fmt: skip
        with ckpt.owned():
            fit(loop)
            ckpt.remove()
        self.net = net.eval()
        return {"pixelcnn_nll": self.nll(codes)}

    @torch.no_grad()
    def nll(self, codes: Tensor, batch: int = 1000) -> float:
        """Mean negative log-likelihood per code, in nats, of code grids (N, 7, 7)."""
        assert self.net is not None, "fit or load the sampler first"
        total = sum(
            F.cross_entropy(self.net(c), c, reduction="sum").item() for c in codes.split(batch)
        )
        return total / codes.numel()

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        assert self.net is not None, "fit or load the sampler first"
        device = next(self.net.parameters()).device
        codes = self.net.sample(n, generator, device).cpu()
        # Channel-major flattening of the (code_dim, 7, 7) grid, as VQVAE.decode takes it.
        grid = F.embedding(codes, torch.from_numpy(self.codebook)).permute(0, 3, 1, 2)
        return grid.flatten(1)

    def arrays(self) -> dict[str, np.ndarray]:
        assert self.net is not None
        state = {f"net.{k}": v.cpu().numpy() for k, v in self.net.state_dict().items()}
        return state | {"codebook": self.codebook}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.codebook = arrays["codebook"]
        self.net = PixelCNN(len(self.codebook), self.cfg.channels, self.cfg.layers).eval()
        state = {k[4:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("net.")}
        self.net.load_state_dict(state)
