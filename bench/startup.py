"""Start-up of each stage: the ``-X importtime`` total of what a stage imports before any work.

Each row imports ``bam_vae.cli`` and one stage module in a fresh interpreter, as
``bam <stage>`` does, and is compared with ``import torch`` alone (the floor of any stage
that touches a tensor) in the same round, as is ``import torch, mlflow`` (the floor of a
stage that logs to MLflow). Rounds are interleaved and the minimum per row is
kept: these machines drift within minutes. Also times ``bam --help`` and ``bam train --help``
(wall clock, minimum over rounds).

    python bench/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

STAGES = [
    "prepare", "train", "train_evaluator", "fid_reference", "fit_sampler", "generate",
    "compute_fid", "tsne", "robustness", "report",
]  # fmt: skip
BAM = Path(sys.executable).with_name("bam")


def import_seconds(statement: str) -> float:
    """Sum of the self times ``python -X importtime`` reports for ``statement``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    times = re.findall(r"^import time:\s+(\d+) \|", done.stderr, flags=re.M)
    return sum(int(t) for t in times) / 1e6


def wall_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, check=True)
    return time.perf_counter() - start


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # The floors: any stage that touches a tensor imports torch; one that logs to MLflow, both.
    rows = {"torch": "import torch", "torch+mlflow": "import torch, mlflow"}
    rows |= {s: f"import bam_vae.cli, bam_vae.stages.{s}" for s in STAGES}
    best = dict.fromkeys(rows, float("inf"))
    helps = {"bam --help": [str(BAM), "--help"], "bam train --help": [str(BAM), "train", "--help"]}
    help_best = dict.fromkeys(helps, float("inf"))
    for _ in range(args.rounds):
        for name, statement in rows.items():
            best[name] = min(best[name], import_seconds(statement))
        for name, command in helps.items():
            help_best[name] = min(help_best[name], wall_seconds(command))
    print(f"{cpu()}, Python {platform.python_version()}, {args.rounds} interleaved rounds (min)")
    print(f"{'stage':<16} {'imports (s)':>11} {'x torch':>8}")
    for name, seconds in best.items():
        print(f"{name:<16} {seconds:>11.2f} {seconds / best['torch']:>8.2f}")
    for name, seconds in help_best.items():
        print(f"{name:<16} {seconds:>11.2f} (wall clock)")


if __name__ == "__main__":
    main()
