"""What a conv net's size costs to train here: images/s of the training stage's own step
(``RAE.train_step``, fused Adam, batch 100 as RAE's code) for the report's net and deeper
ones up to the size of RAE's MNIST network, each in a fresh process, interleaved over rounds.
The rate is measured, not counted from layer shapes; minutes per epoch and hours for RAE's
100 epochs follow from it.

    python bench/network_size.py [--steps 6] [--rounds 2] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from interleaved import run_rounds, set_up_process

from bam_vae.config import ModelConfig, TrainConfig
from bam_vae.machine import available_cores, cpu_name
from bam_vae.models import build_model, n_parameters
from bam_vae.training.runtime import fast_path

SIZES = {  # name -> (channels, batch norm)
    "report [32,64]": ([32, 64], False),
    "[64,128,256] bn": ([64, 128, 256], True),
    "[128,256,512] bn": ([128, 256, 512], True),
    "RAE [128,256,512,1024] bn": ([128, 256, 512, 1024], True),
}
BATCH = 100


def child(name: str, steps: int, precision: str) -> None:
    set_up_process(available_cores(), as_stage=True)
    channels, bn = SIZES[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="rae", z_dim=16, channels=channels, batch_norm=bn))
    cfg = TrainConfig(k2=0.0049, lr=5e-4, precision=precision)
    autocast = fast_path(model, precision, torch.device("cpu"))
    (opt,) = model.configure_optimizers(cfg)
    x = torch.rand(BATCH, 1, 28, 28)
    model.train()
    with autocast():
        model.train_step(x, None, [opt], cfg, 0)  # warm-up: allocations, oneDNN's kernels
    began = time.perf_counter()
    for _ in range(steps):
        with autocast():
            model.train_step(x, None, [opt], cfg, 0)
    rate = steps * BATCH / (time.perf_counter() - began)
    print(json.dumps({"rate": rate, "compile_s": None, "params": n_parameters(model)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", choices=list(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.precision)
        return
    extra = ["--steps", str(args.steps), "--precision", args.precision]
    rates, _, _ = run_rounds(__file__, list(SIZES), extra, args.rounds)
    print(f"{cpu_name()}, {available_cores()} cores, {args.precision}, batch {BATCH},"
          f" {args.steps} steps x {args.rounds} rounds (median)")  # fmt: skip
    print("| net | parameters | images/s | vs the report's net | min per epoch (60 000) |"
          " h for 100 epochs |\n|---|---|---|---|---|---|")  # fmt: skip
    base = statistics.median(rates[next(iter(SIZES))])
    for name, (channels, bn) in SIZES.items():
        rate = statistics.median(rates[name])
        params = n_parameters(build_model(ModelConfig(arch="rae", channels=channels,
                                                      batch_norm=bn)))  # fmt: skip
        print(
            f"| {name} | {params:,} | {rate:.1f} | {rate / base:.3f}x |"
            f" {60_000 / rate / 60:.1f} | {100 * 60_000 / rate / 3600:.1f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
