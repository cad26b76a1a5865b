"""Inception FID features: images/s and GFLOP/s against this machine's matmul peak.

In one process: a large matmul (fp32, bf16) for the peak; then pytorch-fid's network as it
ships (eager, fp32) against ours (batch norms folded, channels-last, inference mode; compiled
with frozen weights; bf16 autocast), and what bf16 does to an FID (|dFID| against fp32, the
reference protocol) between generated and real images.

    python bench/inception_throughput.py [--images 192] [--fid-images 500]
"""

from __future__ import annotations

import argparse
import time

import torch

from bam_vae.config import load_params
from bam_vae.data import load_split
from bam_vae.fid import fid, load_generated
from bam_vae.inception import FeatureNet, inception_features, load_inception
from bam_vae.inception import resolve_inception_weights as weights_path
from bam_vae.train import configure_threads, cpu_name

BATCH = 64  # inception_features' batch size
GFLOP_PER_IMAGE = 11.5  # InceptionV3 at 299 x 299: ~5.7 G multiply-adds


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def images_per_second(extract, images: torch.Tensor) -> float:
    extract(images[:BATCH])  # warm-up, at the batch shape the timed run uses (no recompiling)
    start = time.perf_counter()
    extract(images)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--fid-images", type=int, default=500)
    args = parser.parse_args()
    params = load_params("params.yaml")
    print(f"cpu: {cpu_name()}; torch threads: {configure_threads(params.train.threads)}")
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul 2048^2 peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")

    test, _ = load_split(params.data.out_dir, "test")
    x = test[: args.images].float().div(255.0).unsqueeze(1)
    w = weights_path(params.fid.inception_weights)
    shipped, ours = load_inception(w, "cpu", fast=False), load_inception(w, "cpu")
    nets = {p: FeatureNet(load_inception(w, "cpu"), p) for p in ("fp32", "bf16")}
    for net in nets.values():
        net.compile()
        start = time.perf_counter()
        net(x[:BATCH])  # the first call compiles, for this batch shape
        print(f"compiling the {net.precision} network: {time.perf_counter() - start:.1f} s")
    rows = {
        "pytorch-fid as shipped (fp32)": (lambda i: inception_features(shipped, i), "fp32"),
        "ours, eager (fp32)": (lambda i: inception_features(ours, i), "fp32"),
        "ours, compiled (fp32)": (nets["fp32"], "fp32"),
        "ours, compiled (bf16)": (nets["bf16"], "bf16"),
    }
    base = None
    for name, (extract, precision) in rows.items():
        rate = images_per_second(extract, x)
        base = base or rate
        gflops = rate * GFLOP_PER_IMAGE
        print(f"{name:30s} {rate:6.1f} images/s = {rate / base:4.2f}x, {gflops:4.0f} GFLOP/s ="
              f" {100 * gflops / peak[precision]:3.0f} % of the {precision} peak; 10 000-image"
              f" reference {10_000 / rate / 60:4.1f} min")  # fmt: skip

    n = args.fid_images
    fake = torch.as_tensor(load_generated()[:n]).unsqueeze(1)
    real = test[-n:].float().div(255.0).unsqueeze(1)
    scores = {p: fid(net(real), net(fake)) for p, net in nets.items()}
    print(
        f"FID of {len(fake)} generated vs {n} test images: fp32 {scores['fp32']:.3f}, bf16"
        f" {scores['bf16']:.3f}, |dFID| {abs(scores['bf16'] - scores['fp32']):.3f}"
    )


if __name__ == "__main__":
    main()
