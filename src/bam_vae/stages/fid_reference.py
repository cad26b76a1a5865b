"""Stage ``fid-reference@<space>``: features of the test images, and of the training images of
the FID floor, in one FID space."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bam_vae import paths
from bam_vae.config import Params
from bam_vae.datasets import load_split, sha256
from bam_vae.errors import BamError, Interrupted
from bam_vae.files import atomic_path, exclusive, file_sha256, staged_outputs
from bam_vae.scoring.fid import feature_extractor, floor_indices, load_array, reference_path
from bam_vae.training.checkpoints import config_key


def reference(
    params: Params, space: str, ref_dir: Path = paths.FID_REFERENCE_DIR, chunk: int = 1000
) -> Path:
    """Stage ``fid-reference@<space>``: features of the test images (``<space>.npy``, what
    every model is scored against) and of ``fid.floor_n`` training images, a seeded subset
    (``<space>-train.npy``, the real images of the FID floor), computed once per machine.

    The features are cached outside the checkout (``$BAM_VAE_CACHE``, else
    ``~/.cache/bam-vae/fid-reference/``), keyed by the network's weights, the images and the
    precision, so every clone, test run, CI job and queue or Ray worker on this machine reuses
    them (DVC still tracks this stage's outputs). While computing, each chunk of images is
    saved as it is done (the Inception space takes many CPU minutes), so an interrupted run
    resumes at the first missing chunk.
    """
    if space not in ("classifier", "inception"):
        raise BamError(
            f"fid.features: unknown feature space {space!r}; expected classifier or inception"
        )
    test, _ = load_split(params.data.out_dir, "test")
    train, _ = load_split(params.data.out_dir, "train")
    floor = train[floor_indices(len(train), params.fid.floor_n, params.fid.seed)]
    extract, weights = feature_extractor(space, params.fid)
    precision = params.fid.precision if space == "inception" else "fp32"
    network: tuple = (file_sha256(weights), precision, chunk)
    if space == "inception" and params.fid.pad_to != 28:  # unpadded keys stay as they were
        network += (f"pad{params.fid.pad_to}",)
    feats = {split: _cached(extract, network, images, space, split)
             for split, images in (("test", test), ("train", floor))}  # fmt: skip
    with staged_outputs() as out:  # both files or neither
        for split, array in feats.items():
            np.save(out.path(reference_path(space, split, ref_dir)), array)
    for split, array in feats.items():
        print(f"fid-reference: {space} features of {len(array)} {split} images"
              f" -> {reference_path(space, split, ref_dir)}")  # fmt: skip
    return reference_path(space, "test", ref_dir)


def _cached(extract, network: tuple, images, space: str, split: str) -> np.ndarray:
    weights_sha, precision, chunk, *padding = network
    key = config_key(weights_sha, sha256(images.numpy()), chunk, precision, *padding)
    cache = paths.user_cache() / "fid-reference"
    name = f"{space}-{split}-{key}"
    cached, parts = cache / f"{name}.npy", cache / f"{name}.parts"
    # Workers that start together (a queue, a sweep) compute it once: the others wait, then
    # read the cache, instead of writing the same chunks and removing each other's.
    with exclusive(cache / f".{name}.lock", f"fid-reference: {cached}", wait=True):
        if cached.is_file():
            print(f"fid-reference: {space} features of the {split} images from {cached}")
            return load_array(cached, "cached FID reference", "(N, D)", lambda a: a.ndim == 2,
                              "delete it to recompute it")  # fmt: skip
        feats = _compute_in_chunks(extract, images, chunk, parts, f"{space} {split}")
        with atomic_path(cached) as tmp, tmp.open("wb") as fh:
            np.save(fh, feats)
        shutil.rmtree(parts, ignore_errors=True)
    return feats


def _compute_in_chunks(extract, images, chunk: int, parts: Path, space: str) -> np.ndarray:
    x = images.float().div(255.0).unsqueeze(1)
    starts = range(0, len(x), chunk)
    feats, estimated = [], False
    try:
        for i, start in enumerate(tqdm(starts, desc=f"fid-reference {space}", unit="chunk")):
            part = parts / f"{i:05d}.npy"
            if not part.is_file():
                began = time.monotonic()
                with atomic_path(part) as tmp, tmp.open("wb") as fh:
                    np.save(fh, extract(x[start : start + chunk]))
                if not estimated:  # the cost up front: the first chunk's rate, for all
                    estimated = True
                    left = (time.monotonic() - began) * (len(starts) - i) / 60
                    print(f"fid-reference {space}: {len(x)} images, about {left:.0f} min"
                          " more at the first chunk's rate", flush=True)  # fmt: skip
            feats.append(np.load(part))
    except KeyboardInterrupt:
        raise Interrupted(
            f"fid-reference: interrupted with {len(feats)} of {len(starts)} chunks saved in"
            f" {parts} -- run again to resume"
        ) from None
    return np.concatenate(feats)
