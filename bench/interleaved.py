"""What the throughput benches share: each variant in a fresh process of its own (as a stage
runs), interleaved over rounds, and the machine's matmul peak measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from bam_vae.training.runtime import configure_threads


def set_up_process(threads: int, as_stage: bool) -> None:
    """``as_stage``: as every stage does (``configure_threads``, which also keeps freed memory
    in the process); otherwise only the threads, as a textbook script or the old product."""
    if as_stage:
        configure_threads(threads)
    else:
        torch.set_num_threads(threads)


def run_rounds(script: str, variants: list[str], args: list[str], rounds: int):
    """Each variant as ``script --child VARIANT *args`` (it prints one JSON line with ``rate``,
    ``compile_s`` and optionally ``loss``), round after round; returns {variant: [rate per
    round]}, the last compile time of each variant that compiled and {variant: [loss per
    round]} of those that report one. The VMs' speed drifts by 2x within minutes, so callers
    take each ratio against a baseline of the same round."""
    rates: dict[str, list[float]] = {v: [] for v in variants}
    compile_s: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for _ in range(rounds):
        for v in variants:
            done = subprocess.run([sys.executable, script, "--child", v, *args], check=True,
                                  capture_output=True)  # fmt: skip
            out = json.loads(done.stdout)
            rates[v].append(out["rate"])
            if out["compile_s"] is not None:
                compile_s[v] = out["compile_s"]
            if out.get("loss") is not None:
                losses.setdefault(v, []).append(out["loss"])
    return rates, compile_s, losses


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """FLOP/s of an n x n matmul on ``device``: the machine's practical peak for this dtype.

    At most ``repeats`` products, fewer once 2 s have passed: a CPU without bf16 instructions
    emulates them about a hundred times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        n, repeats = 8192, 50  # a GPU needs a larger product to reach its peak
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a[:256, :256] @ b[:256, :256]  # warm-up
    synchronize(device)
    done, start = 0, time.perf_counter()
    while done < repeats and (done == 0 or time.perf_counter() - start < 2.0):
        a @ b
        synchronize(device)
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - start)
