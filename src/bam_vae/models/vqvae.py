"""VQ-VAE (van den Oord et al. 2017): a 7 x 7 grid of codes from an EMA codebook.

Its learned code prior, a PixelCNN over the grid, is a sampler (``samplers/pixelcnn.py``),
fitted by stage ``fit-sampler`` to the codes of the trained model.

How the model fills the shared :class:`VAEOutput` record (the loop and the scoring stages read
it): ``mu`` is the flattened encoder output z_e (continuous, what the commitment term pulls
towards the codebook), ``logvar`` is zeros (there is no posterior variance), and ``z`` is the
flattened quantised grid with straight-through gradients (what the decoder saw). Flattening is
channel-major, (code_dim, 7, 7), so ``z_dim = 7 * 7 * code_dim`` and ``decode`` takes flat
vectors like every other model. There is no KL term: ``kl`` is zeros and the loss is
reconstruction + commitment (``train.k1`` and ``train.k2`` are not used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam_vae.models.base import VAE, LossParts, VAEOutput, recon_per_image

if TYPE_CHECKING:
    from bam_vae.config import TrainConfig, VQConfig

GRID = 7  # 28 -> 14 -> 7
EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes, as in Sonnet's VectorQuantizerEMA


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour codebook whose entries are EMA means of the vectors assigned to them.

    The codebook is a buffer (no gradient, not in any optimiser). ``cluster_size`` starts at 1
    and ``embed_sum`` at the codebook, as if each code had already seen one vector at its own
    position: without that, an unused code is divided by a size of ~EPS and flies off (zero
    initial sizes) or collapses to 0 (Sonnet's zero-debiased averages).

    Measured on 10k MNIST images at the defaults: only 5-8% of the 128 codes stay in use after
    the first epoch (also when the codebook starts from encoder outputs). There are no
    dead-code restarts: Jukebox-style restarts (EMA size < 1) kept every code in use but
    stalled the reconstruction at the mean image.
    """

    def __init__(self, n_codes: int, dim: int, decay: float):
        super().__init__()
        self.decay = decay
        codebook = torch.empty(n_codes, dim).uniform_(-1 / n_codes, 1 / n_codes)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_sum", codebook.clone())
        # Persistent so a run resumed mid-epoch still reports the whole epoch's usage.
        self.register_buffer("usage", torch.zeros(n_codes))

    @staticmethod
    def vectors(z_e: Tensor) -> Tensor:
        """A grid (N, D, H, W) as rows (N * H * W, D), without gradient."""
        return z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])

    def lookup(self, z_e: Tensor) -> Tensor:
        """Indices (N, H, W) of the nearest codes to the vectors of a grid (N, D, H, W)."""
        flat = self.vectors(z_e)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T
        dist = dist + self.codebook.pow(2).sum(1)
        n, _, h, w = z_e.shape
        return dist.argmin(1).reshape(n, h, w)

    def embed(self, idx: Tensor) -> Tensor:
        """Codes (N, H, W) -> their vectors as a grid (N, D, H, W)."""
        return F.embedding(idx, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """(indices, quantised grid); in training mode the codebook moves towards the batch
        after the quantised grid was read from it."""
        idx = self.lookup(z_e)
        q = self.embed(idx)
        if self.training:
            self._update(self.vectors(z_e), idx.flatten())
        return idx, q

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor) -> None:
        onehot = F.one_hot(idx, len(self.codebook)).type_as(flat)
        counts = onehot.sum(0)
        self.usage += counts
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + EPS) / (n + len(self.codebook) * EPS) * n
        self.codebook.copy_(self.embed_sum / size.unsqueeze(1))

    def epoch_stats(self) -> dict[str, float]:
        """Share of codes used and perplexity of the usage since the last call; then reset."""
        total = self.usage.sum()
        if total == 0:
            return {}
        p = self.usage / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        stats = {
            "codebook_usage": (p > 0).float().mean().item(),
            "perplexity": entropy.exp().item(),
        }
        self.usage.zero_()
        return stats


class VQVAE(VAE):
    latent_kind = "codes"  # samplers fit code grids (``codes``), not posterior means

    def __init__(self, channels: list[int], cfg: VQConfig):
        super().__init__(GRID * GRID * cfg.code_dim)
        self.cfg = cfg
        c1, c2 = channels
        d = cfg.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Conv2d(c2, d, 1),  # one code_dim vector per cell
        )
        self.quantizer = VectorQuantizerEMA(cfg.codebook_size, d, cfg.decay)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (d, GRID, GRID)),
            nn.Conv2d(d, c2, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # 14 -> 28
        )

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z_e = self.encoder(x).flatten(1)
        return z_e, torch.zeros_like(z_e)

    def codes(self, x: Tensor) -> Tensor:
        """Code indices (N, 7, 7) of images; never touches the codebook."""
        return self.quantizer.lookup(self.encoder(x))

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> VAEOutput:
        z_e = self.encoder(x)
        _, q = self.quantizer(z_e)
        z = z_e + (q - z_e).detach()  # straight-through: the decoder's gradient reaches z_e
        z_e, z = z_e.flatten(1), z.flatten(1)
        return VAEOutput(logits=self.decoder(z), mu=z_e, logvar=torch.zeros_like(z_e), z=z)

    def loss_per_image(self, out: VAEOutput, x: Tensor, cfg: TrainConfig) -> LossParts:
        rec = recon_per_image(out.logits, x, cfg.recon)
        # ||z_e - sg(e)||^2 summed like the reconstruction; the codebook itself learns by EMA.
        commit = self.cfg.commitment * (out.mu - out.z.detach()).pow(2).sum(1)
        # ``extra`` is only logged (the total carries the gradient): detached, so logging it
        # does not convert a tensor that requires grad.
        return LossParts(rec + commit, rec, torch.zeros_like(rec), {"commit": commit.detach()})

    def on_epoch_end(self) -> dict[str, float]:
        return self.quantizer.epoch_stats()

    # -- scoring hooks
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, y: Tensor | None = None) -> Tensor:
        """Codes drawn from the prior the VQ-VAE is trained under, uniform and independent
        per position, decoded: (n, 1, 28, 28) in [0, 1]. ``generator`` is a CPU generator.

        Sampler ``pixelcnn`` (the default for this model) draws from a learned prior instead."""
        shape = (n, GRID, GRID)
        codes = torch.randint(len(self.quantizer.codebook), shape, generator=generator)
        return torch.sigmoid(self.decode(self.embed_codes(codes)))

    def embed_codes(self, codes: Tensor) -> Tensor:
        """Code grids (N, 7, 7) int64 -> flat quantised latents (N, z_dim), what ``decode``
        takes, on the model's device."""
        return self.quantizer.embed(codes.to(self.quantizer.codebook.device)).flatten(1)

    def latent(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The quantised grid, flattened (base ``reconstruct`` decodes exactly this)."""
        return self.quantizer.embed(self.codes(x)).flatten(1)
