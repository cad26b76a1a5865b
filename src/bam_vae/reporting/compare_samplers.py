"""``bam compare-samplers``: one model's samples from every sampler that fits it, side by side."""

from __future__ import annotations

from pathlib import Path

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split
from bam_vae.errors import BamError
from bam_vae.figures import image_panels
from bam_vae.models.saved import load_model
from bam_vae.samplers import (
    KINDS,
    fitted_sampler,
    sample,
    sample_labels,
    sampler_class,
    sampler_for,
)
from bam_vae.tracking import store as tracking
from bam_vae.training.runtime import resolve_device


def compare_samplers(
    params: Params,
    model_uri: str | None = None,
    out: Path = paths.FIGURES / "samplers.png",
    n: int = 100,
) -> Path:
    """``n`` samples of each sampler that fits the model's latents (same seed), in one PNG.

    Samplers logged in the model's run are used as they are; a missing one is fitted here,
    with the current params, and not saved."""
    model_path, run_id = tracking.resolve_model(model_uri)
    vae, _ = load_model(model_path)
    vae.to(resolve_device(params.generate.device, "generate.device"))
    kinds = [k for k in KINDS if vae.latent_kind in sampler_class(k).fits]
    labels = sample_labels(n, params.generate.seed, None) if vae.conditional else None
    panels, train = [], None
    for kind in kinds:
        cfg = params.generate.model_copy(update={"sampler": kind})
        try:
            sampler = fitted_sampler(cfg, vae, model_path, run_id)
        except BamError:
            train = train or load_split(params.data.out_dir, "train")
            sampler = sampler_for(cfg, vae)
            sampler.fit(sampler.encode(vae, *train), train[1])
        panels.append((kind, sample(vae, sampler, n, params.generate.seed, labels)))
    image_panels(panels, f"{model_uri or model_path}: {n} samples per sampler", out)
    print(f"compare-samplers: {', '.join(kinds)} -> {out}")
    return out
