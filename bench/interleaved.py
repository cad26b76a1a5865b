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
    """Each variant as ``script --child VARIANT *args`` (it prints one JSON line with ``rate``
    and ``compile_s``), round after round; returns {variant: [rate per round]} and the last
    compile time of each variant that compiled. The VMs' speed drifts by 2x within minutes,
    so callers take each ratio against a baseline of the same round."""
    rates: dict[str, list[float]] = {v: [] for v in variants}
    compile_s: dict[str, float] = {}
    for _ in range(rounds):
        for v in variants:
            done = subprocess.run([sys.executable, script, "--child", v, *args], check=True,
                                  capture_output=True)  # fmt: skip
            out = json.loads(done.stdout)
            rates[v].append(out["rate"])
            if out["compile_s"] is not None:
                compile_s[v] = out["compile_s"]
    return rates, compile_s


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)
