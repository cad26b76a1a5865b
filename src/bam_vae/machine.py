"""What machine this is: cores available to this process, the processor's name.

Without torch, so a sweep's Ray worker can ask before any trial imports it.
"""

from __future__ import annotations

import os
import platform


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name: speeds (and bf16's gain) differ between the machines a
    sweep or CI lands on, so runs and benchmarks record it."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
