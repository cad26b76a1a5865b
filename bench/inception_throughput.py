"""Inception FID features: images/s and GFLOP/s against this machine's matmul peak.

Each row runs in a fresh process of its own (as a stage does), interleaved over rounds:
pytorch-fid's network as it ships (eager, fp32, glibc's malloc defaults: the product before
this work) against ours (batch norms folded, channels-last, inference mode, freed memory kept
in the process; compiled with frozen weights; bf16 autocast). Then what bf16 does to an FID
(|dFID| against fp32, the reference protocol) between generated and real images.

    python bench/inception_throughput.py [--images 192] [--fid-images 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from interleaved import matmul_peak, run_rounds, set_up_process

from bam_vae.config import load_params
from bam_vae.datasets import load_split
from bam_vae.machine import available_cores, cpu_name
from bam_vae.scoring.fid import fid, load_generated
from bam_vae.scoring.inception import FeatureNet, inception_features, load_inception
from bam_vae.scoring.inception import resolve_inception_weights as weights_path
from bam_vae.training.runtime import configure_threads

BATCH = 64  # inception_features' batch size
GFLOP_PER_IMAGE = 11.5  # InceptionV3 at 299 x 299: ~5.7 G multiply-adds
ROWS = {  # name: (label, precision)
    "shipped": ("pytorch-fid as shipped (fp32)", "fp32"),
    "eager-plain": ("ours, eager, glibc's malloc (fp32)", "fp32"),
    "eager": ("ours, eager (fp32)", "fp32"),
    "compiled": ("ours, compiled (fp32)", "fp32"),
    "compiled-bf16": ("ours, compiled (bf16)", "bf16"),
}


def child(row: str, n_images: int, threads: int) -> None:
    """One row in this fresh process: warmed up (compiled) on one batch, then timed."""
    set_up_process(threads, as_stage=row not in ("shipped", "eager-plain"))
    params = load_params("params.yaml")
    test, _ = load_split(params.data.out_dir, "test")
    x = test[:n_images].float().div(255.0).unsqueeze(1)
    net = load_inception(weights_path(params.fid.inception_weights), "cpu", row != "shipped")
    if row.startswith("compiled"):
        extract = FeatureNet(net, ROWS[row][1])
        extract.compile()
    else:
        extract = lambda images: inception_features(net, images)  # noqa: E731
    start = time.perf_counter()
    extract(x[:BATCH])  # warm-up at the timed batch shape; compiles the compiled rows
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    extract(x)
    rate = len(x) / (time.perf_counter() - start)
    compiled = row.startswith("compiled")
    print(json.dumps({"rate": rate, "compile_s": compile_s if compiled else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--fid-images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params("params.yaml")
    threads = params.train.threads or max(1, available_cores())
    if args.child:
        return child(args.child, args.images, threads)

    configure_threads(threads)
    print(f"cpu: {cpu_name()}; torch threads: {threads}")
    # Each ratio is against the shipped row of its own round (the VMs' speed drifts), median.
    child_args = ["--images", str(args.images)]
    rates, compile_s, _ = run_rounds(__file__, list(ROWS), child_args, args.rounds)
    peak = {"fp32": matmul_peak(torch.float32) / 1e9, "bf16": matmul_peak(torch.bfloat16) / 1e9}
    print(f"matmul 2048^2 peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    for row, (label, precision) in ROWS.items():
        rate = statistics.median(rates[row])
        ratios = [r / b for r, b in zip(rates[row], rates["shipped"], strict=True)]
        gflops = rate * GFLOP_PER_IMAGE
        print(f"{label:36s} {rate:6.1f} images/s = {statistics.median(ratios):4.2f}x"
              f" [{' '.join(f'{r:.2f}' for r in ratios)}], {gflops:4.0f} GFLOP/s ="
              f" {100 * gflops / peak[precision]:3.0f} % of the {precision} peak; 10 000-image"
              f" reference {10_000 / rate / 60:4.1f} min")  # fmt: skip
    for row, seconds in compile_s.items():
        print(f"{ROWS[row][0]}: compiling took {seconds:.1f} s (the last round)")

    test, _ = load_split(params.data.out_dir, "test")
    n = args.fid_images
    fake = torch.as_tensor(load_generated()[:n]).unsqueeze(1)
    real = test[-n:].float().div(255.0).unsqueeze(1)
    w = weights_path(params.fid.inception_weights)
    nets = {p: FeatureNet(load_inception(w, "cpu"), p) for p in ("fp32", "bf16")}
    scores = {p: fid(net(real), net(fake)) for p, net in nets.items()}
    print(
        f"FID of {len(fake)} generated vs {n} test images: fp32 {scores['fp32']:.3f}, bf16"
        f" {scores['bf16']:.3f}, |dFID| {abs(scores['bf16'] - scores['fp32']):.3f}"
    )


if __name__ == "__main__":
    main()
