"""Paths through a latent space to decode: interpolations between two latents and traversals
of single dimensions. Latents are float32 tensors (N x D) of what the decoder takes."""

from __future__ import annotations

import torch


def lerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` points from ``a`` to ``b`` (D each) on the straight line: steps x D."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype)[:, None]
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` points from ``a`` to ``b`` (D each) along the great circle, the norm
    interpolated linearly (White 2016, "Sampling Generative Networks"): under an N(0, I)
    prior the midpoints keep the norm typical of the prior, where ``lerp`` shrinks it."""
    na, nb = a.norm(), b.norm()
    cos = torch.dot(a / na, b / nb).clamp(-1, 1)
    omega = torch.arccos(cos)
    t = torch.linspace(0, 1, steps, dtype=a.dtype)[:, None]
    if omega < 1e-4:  # (anti)parallel: the circle is the line
        return lerp(a, b, steps)
    direction = torch.sin((1 - t) * omega) * a / na + torch.sin(t * omega) * b / nb
    return direction / torch.sin(omega) * ((1 - t) * na + t * nb)


def traversal(
    centre: torch.Tensor, dims: list[int], scale: torch.Tensor, steps: int, span: float = 3.0
) -> torch.Tensor:
    """For each dimension in ``dims``, ``steps`` copies of ``centre`` (D) with that dimension
    moved from ``-span`` to ``+span`` times its ``scale`` (D, e.g. the posterior means'
    standard deviation) around its centre value: (len(dims) * steps) x D, one row per dim."""
    offsets = torch.linspace(-span, span, steps, dtype=centre.dtype)
    rows = []
    for d in dims:
        row = centre.repeat(steps, 1)
        row[:, d] += offsets * scale[d]
        rows.append(row)
    return torch.cat(rows)
