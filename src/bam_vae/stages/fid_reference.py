"""Stage ``fid-reference@<space>``: features of the 10 000 test images in one FID space."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split, sha256
from bam_vae.errors import BamError, Interrupted
from bam_vae.files import atomic_path, exclusive, file_sha256
from bam_vae.scoring.fid import feature_extractor, load_array
from bam_vae.training.checkpoints import config_key


def reference(
    params: Params, space: str, ref_dir: Path = paths.FID_REFERENCE_DIR, chunk: int = 1000
) -> Path:
    """Stage ``fid-reference@<space>``: features of the 10 000 test images, computed once per
    machine.

    The features are cached outside the checkout (``$BAM_VAE_CACHE``, else
    ``~/.cache/bam-vae/fid-reference/``), keyed by the network's weights, the test data and the
    precision, so every clone, test run, CI job and queue or Ray worker on this machine reuses
    them (DVC still tracks this stage's output). While computing, each chunk of test images is
    saved as it is done (the Inception space takes many CPU minutes), so an interrupted run
    resumes at the first missing chunk.
    """
    if space not in ("classifier", "inception"):
        raise BamError(
            f"fid.features: unknown feature space {space!r}; expected classifier or inception"
        )
    images, _ = load_split(params.data.out_dir, "test")
    extract, weights = feature_extractor(space, params.fid)
    precision = params.fid.precision if space == "inception" else "fp32"
    key = config_key(file_sha256(weights), sha256(images.numpy()), chunk, precision)
    cache = paths.user_cache() / "fid-reference"
    cached, parts = cache / f"{space}-{key}.npy", cache / f"{space}-{key}.parts"
    out = ref_dir / f"{space}.npy"
    # Workers that start together (a queue, a sweep) compute it once: the others wait, then
    # read the cache, instead of writing the same chunks and removing each other's.
    with exclusive(cache / f".{space}-{key}.lock", f"fid-reference: {cached}", wait=True):
        if cached.is_file():
            feats = load_array(cached, "cached FID reference", "(N, D)", lambda a: a.ndim == 2,
                               "delete it to recompute it")  # fmt: skip
            print(f"fid-reference: {space} features from this machine's cache {cached}")
        else:
            feats = _compute_in_chunks(extract, images, chunk, parts, space)
            with atomic_path(cached) as tmp, tmp.open("wb") as fh:
                np.save(fh, feats)
            shutil.rmtree(parts, ignore_errors=True)
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        np.save(fh, feats)
    print(f"fid-reference: {space} features of {len(feats)} test images -> {out}")
    return out


def _compute_in_chunks(extract, images, chunk: int, parts: Path, space: str) -> np.ndarray:
    x = images.float().div(255.0).unsqueeze(1)
    starts = range(0, len(x), chunk)
    feats = []
    try:
        for i, start in enumerate(tqdm(starts, desc=f"fid-reference {space}", unit="chunk")):
            part = parts / f"{i:05d}.npy"
            if not part.is_file():
                with atomic_path(part) as tmp, tmp.open("wb") as fh:
                    np.save(fh, extract(x[start : start + chunk]))
            feats.append(np.load(part))
    except KeyboardInterrupt:
        raise Interrupted(
            f"fid-reference: interrupted with {len(feats)} of {len(starts)} chunks saved in"
            f" {parts} -- run again to resume"
        ) from None
    return np.concatenate(feats)
