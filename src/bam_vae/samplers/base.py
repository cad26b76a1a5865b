"""What every latent sampler shares: the contract, the file format, the PCA front for big z.

A sampler replaces z ~ N(0, I) at generation time with draws from a density fitted, after
training, to the posterior means of the training images (the VAE's aggregate posterior
rarely fills N(0, I): the "holes"). It is saved as a plain ``.npz`` (arrays and one JSON
string; read with ``allow_pickle=False``, so loading runs no code) that records which model
file it was fitted to.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from bam_vae.errors import BamError, reason
from bam_vae.files import atomic_path
from bam_vae.models.base import adam, on_device
from bam_vae.training.checkpoints import Checkpoint, checkpoint_path, config_key
from bam_vae.training.loop import Loop, fit

if TYPE_CHECKING:
    from bam_vae.models import VAE

FORMAT = "bam-vae-sampler/1"


class LatentSampler:
    """Fit on latents (N x z_dim, float32) and optional labels; draw new latents.

    Subclasses set ``kind`` and implement ``_fit``, ``_sample`` and the array state; the base
    class handles the optional PCA front and the saved file.
    """

    kind: ClassVar[str]
    # The latents it can be fitted to (``VAE.latent_kind``): continuous means or codes.
    fits: ClassVar[tuple[str, ...]] = ("continuous",)
    config_type: ClassVar[type | None] = None  # its params section (pydantic), if any

    def __init__(self, z_dim: int, conditional: bool, max_dim: int) -> None:
        self.z_dim = z_dim
        self.conditional = conditional
        self.max_dim = max_dim
        self.n_classes = 10  # a conditional sampler's classes (set by the registry)
        self.pca: Pca | None = None
        self.device = torch.device("cpu")  # where it is fitted: the model's (``encode``)

    # -- to implement
    def _fit(self, latents: Tensor, labels: Tensor | None) -> dict[str, float]:
        raise NotImplementedError

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        """The params that made this sampler (recorded in the file and in MLflow)."""
        return {}

    # -- shared
    @torch.no_grad()
    def encode(self, vae: VAE, images: Tensor, labels: Tensor, batch: int = 1000) -> Tensor:
        """What this sampler is fitted to, for training images (uint8, N x 28 x 28) on the
        CPU: the posterior means (N x z_dim), encoded on ``vae``'s device (the images moved
        there once, as bytes). The sampler is then fitted on that device too."""
        self.device = vae.device
        return vae.latents(images, labels, batch)

    def fit(self, latents: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """Fit to ``latents``; above ``max_dim`` dims, in the span of their top principal axes.

        Returns what is worth logging (e.g. log-likelihood, explained variance)."""
        latents = latents.double()
        info: dict[str, float] = {}
        if latents.shape[1] > self.max_dim:
            self.pca = Pca.fit(latents, self.max_dim)
            info["pca_explained_variance"] = self.pca.explained
            latents = self.pca.project(latents)
        return info | self._fit(latents, labels if self.conditional else None)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: Tensor | None = None) -> Tensor:
        """``n`` latents (float32, n x z_dim); conditional samplers draw class ``labels[i]``."""
        if self.conditional and labels is None:
            raise BamError(f"{self.kind} sampler of a conditional model needs the classes to draw")
        z = self._sample(n, generator, labels if self.conditional else None).double()
        if self.pca is not None:
            z = self.pca.restore(z, generator)
        return z.float()

    def draw(self, vae: VAE, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        """``n`` images in [0, 1] (on ``vae``'s device) from its decoder at latents drawn from
        this sampler (on the CPU, with ``generator``)."""
        z = self.sample(n, generator, labels)
        return torch.sigmoid(vae.decode(*on_device(vae.device, z, labels)))

    def save(self, path: Path, model_sha256: str) -> None:
        meta = {
            "format": FORMAT, "kind": self.kind, "z_dim": self.z_dim,
            "conditional": self.conditional, "n_classes": self.n_classes, "max_dim": self.max_dim,
            "model_sha256": model_sha256, "config": self.config(),
        }  # fmt: skip
        arrays = self.arrays() | ({} if self.pca is None else self.pca.arrays())
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)


class NetSampler(LatentSampler):
    """A sampler that is a torch net fitted to the standardised latents in the one training
    loop (resumable; keyed by its config and its inputs) and saved as its state dict's
    arrays: ``two-stage`` and ``flow``. Subclasses give the net (``_build``), its loss on a
    batch (``_loss``), how it maps u ~ N(0, I) to standardised latents (``_decode``) and what
    of its fit is worth logging (``_report``)."""

    def __init__(self, z_dim: int, conditional: bool, max_dim: int, cfg: Any) -> None:
        super().__init__(z_dim, conditional, max_dim)
        self.cfg = cfg
        self.net: Any = None
        self.shift = self.scale = np.zeros(0)

    def config(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def _build(self, dim: int) -> torch.nn.Module:
        raise NotImplementedError

    def _loss(self, net: Any, z: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _decode(self, u: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _report(self, net: Any, history_row: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def _fit(self, latents: Tensor, labels: Tensor | None) -> dict[str, float]:
        # Standardised inputs: the same learning rate works for any latent scale.
        self.shift = latents.mean(0).numpy()
        self.scale = latents.std(0).clamp_min(1e-6).numpy()
        z = ((latents - latents.mean(0)) / torch.from_numpy(self.scale)).float()
        torch.manual_seed(self.cfg.seed)  # the net's initial weights and any noise it draws
        net = self._build(z.shape[1])
        optimizer = adam(net.parameters(), self.cfg.lr)

        def step(idx: Tensor, epoch: int) -> dict[str, float]:
            loss = self._loss(net, z[idx], None if labels is None else labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        key = config_key(self.config(), tensor_digest(z, labels))
        ckpt = Checkpoint(checkpoint_path(key, self.kind), net, [optimizer], self.kind)
        section = self.kind.replace("-", "_")
        loop = Loop(self.kind, len(z), self.cfg.batch_size, self.cfg.epochs, step, ckpt,
                    self.cfg.seed, lr_key=f"generate.{section}.lr={self.cfg.lr}")  # fmt: skip
        with ckpt.owned():
            state = fit(loop)
            ckpt.remove()
        self.net = net.eval()
        return self._report(net, state.history[-1])

    def _sample(self, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
        assert self.net is not None, "fit or load the sampler first"
        u = torch.randn(n, len(self.shift), generator=generator)
        z = self._decode(u, labels).double()
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


def tensor_digest(*tensors: Tensor | None) -> str:
    """SHA-256 of tensors' bytes: part of a sampler fit's resume key (same inputs, same key)."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is not None:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Pca:
    """Top principal axes of the latents, plus isotropic noise for the rest (probabilistic PCA).

    A VAE with a large z uses few of its dimensions (the rest collapse to the prior and have
    posterior means near 0), so the means live in a small subspace; fitting there keeps the
    cost of a full-covariance mixture or a second VAE bounded whatever z_dim is.
    """

    def __init__(self, mean: Tensor, axes: Tensor, residual_std: float, explained: float):
        self.mean, self.axes = mean, axes  # z_dim; z_dim x k
        self.residual_std, self.explained = residual_std, explained

    @classmethod
    def fit(cls, latents: Tensor, k: int) -> Pca:
        mean = latents.mean(0)
        centred = latents - mean
        cov = centred.T @ centred / max(1, len(latents) - 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        total = float(values.sum()) or 1.0
        rest = values[k:]
        return cls(
            mean,
            vectors[:, :k].contiguous(),
            float(rest.mean().sqrt()) if len(rest) else 0.0,
            float(values[:k].sum()) / total,
        )

    def project(self, latents: Tensor) -> Tensor:
        return (latents - self.mean) @ self.axes

    def restore(self, coords: Tensor, generator: torch.Generator) -> Tensor:
        z = coords @ self.axes.T + self.mean
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        # Only the part of the noise outside the kept axes.
        noise -= noise @ self.axes @ self.axes.T
        return z + self.residual_std * noise

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "pca_mean": self.mean.numpy(), "pca_axes": self.axes.numpy(),
            "pca_residual": np.array([self.residual_std, self.explained]),
        }  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Pca | None:
        if "pca_axes" not in arrays:
            return None
        residual, explained = arrays["pca_residual"].tolist()
        axes = torch.from_numpy(arrays["pca_axes"])
        return cls(torch.from_numpy(arrays["pca_mean"]), axes, residual, explained)


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a sampler file; a missing, corrupt or foreign file is one line."""
    if not path.is_file():
        raise BamError(f"sampler file {path} not found; run `bam fit-sampler` (or `dvc repro`)")
    try:
        with np.load(path, allow_pickle=False) as blob:
            arrays = {k: blob[k] for k in blob.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as exc:
        why = reason(exc)
        raise BamError(f"corrupt sampler file {path}: {why}; run `bam fit-sampler`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BamError(f"sampler file {path} is not a bam-vae sampler (expected {FORMAT})")
    return meta, arrays
