"""The machine a loop runs on: device, threads, memory, fast layouts and autocast, seeding.

Every stage that computes calls :func:`configure_threads` first and resolves its
``device`` param with :func:`resolve_device`.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from bam_vae.errors import BamError
from bam_vae.machine import available_cores


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BamError(f"{key}: 'cuda' requested but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def configure_threads(requested: int) -> int:
    """Torch threads: the param if set, else cores / parallel workers (``BAM_PARALLEL_JOBS``).

    Two torch processes that each take every core run many times slower than one alone, so
    queue workers must split the machine between them. Also keeps freed memory in the process
    (:func:`retain_freed_memory`): every stage that computes calls this first.
    """
    retain_freed_memory()
    jobs = max(1, int(os.environ.get("BAM_PARALLEL_JOBS", "1")))
    threads = requested or max(1, available_cores() // jobs)
    torch.set_num_threads(threads)
    return threads


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")


def retain_freed_memory() -> bool:
    """Keep memory that torch frees in this process instead of handing it back to the kernel.

    glibc's malloc returns blocks of more than a few MB to the kernel (mmap, heap trimming),
    and each step then faults its activations in again, page by zeroed page: 2 000-6 000 page
    faults per step of the default CNN; without them both the CNN's step and the Inception
    features are faster (``bench/train_throughput.py``, ``bench/inception_throughput.py``
    compare the two). jemalloc and tcmalloc, which
    PyTorch's CPU tuning guide recommends, keep freed memory by default too. Only glibc; a
    user's own malloc settings or preloaded allocator win. The process keeps its peak memory
    until it exits (stages are short-lived processes)."""
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _USER_MALLOC_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    )


def fast_path(
    model: torch.nn.Module, precision: str, device: torch.device, channels_last: bool = True
):
    """Channels-last convolutions (oneDNN's fastest layout, in fp32 and more so in bf16:
    ``bench/train_throughput.py``), and
    an autocast context for the training steps, on for ``bf16``.

    Only the steps run under autocast (evaluation, sampling and scoring stay fp32). Backward
    runs inside it too: checked to give bit-identical gradients to a backward outside.
    """
    if channels_last or precision == "bf16":
        model.to(memory_format=torch.channels_last)
    return lambda: torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def training_step(model: torch.nn.Module, cuda_graphs: bool):
    """``model.train_step``, or with ``cuda_graphs`` (``train.cuda_graphs``) that step compiled
    by ``torch.compile(mode="reduce-overhead")``: captured as CUDA graphs once per batch shape,
    then replayed, which cuts a GPU step's kernel-launch costs."""
    step = model.train_step
    return torch.compile(step, mode="reduce-overhead") if cuda_graphs else step


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
