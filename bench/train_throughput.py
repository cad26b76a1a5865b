"""Training throughput (images/s): the textbook torchvision loop, ours in fp32, ours in bf16.

All train the same model with the same batch size and loss, each loop in a fresh process of
its own (as a stage runs), interleaved over rounds; the ratios are what matters (absolute
numbers depend on the machine). ``fp32-plain`` is our fp32 loop with glibc's malloc defaults,
to show what keeping freed memory in the process (``retain_freed_memory``) buys. The
textbook loop uses Adam as ``torch.optim.Adam`` defaults it, ours the fused Adam that training
uses. A large matmul measured in the same run gives the machine's peak, and each loop's share of it.
``--compile`` adds our loops with the step compiled by torch.compile, and its compile time.

``--device cuda`` times the training stage's own step (``VAE.train_step`` and its per-step
loss read-out) on the GPU: eager fp32 and bf16, and both captured as CUDA graphs as
``train.cuda_graphs`` runs them (``torch.compile(mode="reduce-overhead")``), with the first
(capturing) step's time and the mean loss of the timed steps, so the curves can be compared
and each setting's repeat rounds checked for identical losses.

    python bench/train_throughput.py [--batches 150] [--arch cnn] [--compile] [--rounds 4]
    python bench/train_throughput.py --device cuda [--batches 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from interleaved import matmul_peak, run_rounds, set_up_process, synchronize
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bam_vae.config import ModelConfig, load_params
from bam_vae.datasets import load_split
from bam_vae.datasets.idx import write_idx
from bam_vae.machine import available_cores, cpu_name
from bam_vae.models import adam, build_model, on_device, vae_loss
from bam_vae.scoring.evaluator import Evaluator
from bam_vae.training.runtime import epoch_order, fast_path, resolve_device, training_step


def loss_of(model, xb, k1=0.5, k2=0.5):
    return vae_loss(model(xb), xb, k1, k2, "mse").total


def step(model, optimizer, xb, loss=loss_of):
    total = loss(model, xb)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


COMPILE_TIMES: dict[str, float] = {}


def ours(model_cfg, images, batch, n_batches, precision="fp32", compiled=False):
    """Our loop: batches sliced from one in-memory tensor; ``bf16`` as ``train.precision``;
    ``compiled``: forward and loss through torch.compile (backward through AOTAutograd)."""
    model = build_model(model_cfg)
    autocast = fast_path(model, precision, torch.device("cpu"))
    optimizer = adam(model.parameters(), 1e-3)
    loss = torch.compile(loss_of) if compiled else loss_of
    x = images.float().div_(255.0).unsqueeze(1)
    order = epoch_order(len(x), 0, 0)
    if compiled and precision not in COMPILE_TIMES:  # the first step compiles
        start = time.perf_counter()
        with autocast():
            step(model, optimizer, x[:batch], loss)
        COMPILE_TIMES[precision] = time.perf_counter() - start
    start = time.perf_counter()
    for b in range(n_batches):
        with autocast():
            step(model, optimizer, x[order[b * batch : (b + 1) * batch]], loss)
    return n_batches * batch / (time.perf_counter() - start)


def stage_step(params, model_cfg, images, labels, precision, graphs, device):
    """The training stage's step on ``device``, as a function of the batch number returning
    that step's loss: ``VAE.train_step`` under autocast, compiled with mode ``reduce-overhead``
    (CUDA graphs) when ``graphs``, its losses read each step as the stage reads them."""
    cfg = params.train.model_copy(update={"precision": precision, "cuda_graphs": graphs})
    model = build_model(model_cfg).to(device)
    autocast = fast_path(model, precision, device)
    optimizers = model.configure_optimizers(cfg)
    train_step = training_step(model, cfg.cuda_graphs)
    x, y = on_device(device, images.float().div_(255.0).unsqueeze(1), labels)
    order = epoch_order(len(x), 0, 0).to(device)
    batch = cfg.batch_size
    per_epoch = len(x) // batch  # full batches only: a short one would be captured again

    def one(b: int) -> float:
        idx = order[(b % per_epoch) * batch : (b % per_epoch + 1) * batch]
        with autocast():
            return train_step(x[idx], y[idx], optimizers, cfg, 0).as_floats()["loss"]

    return one


def flops_per_image(model: torch.nn.Module) -> float:
    """Training FLOPs per image: 3x the forward pass (forward, two backward matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 1, 28, 28))
    return 3.0 * counter.get_total_flops()


def reference(model_cfg, root, batch, n_batches):
    """torchvision MNIST + ToTensor + DataLoader, as in pytorch/examples' vae/main.py."""
    model = build_model(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataset = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch, shuffle=True)
    start = time.perf_counter()
    for b, (xb, _) in enumerate(loader):
        if b == n_batches:
            break
        step(model, optimizer, xb)
    return n_batches * batch / (time.perf_counter() - start)


LOOPS = {
    "textbook": "textbook (torchvision MNIST + ToTensor + DataLoader)",
    "fp32-plain": "bam-vae fp32, glibc's malloc defaults",
    "fp32": "bam-vae fp32 (in-memory tensor slices)",
    "bf16": "bam-vae bf16 (train.precision=bf16)",
    "fp32-compile": "bam-vae fp32, torch.compile",
    "bf16-compile": "bam-vae bf16, torch.compile",
}
DEVICE_LOOPS = {
    "fp32": "the training step, fp32",
    "bf16": "the training step, bf16 autocast",
    "fp32-graphs": "the training step, fp32, CUDA graphs (train.cuda_graphs)",
    "bf16-graphs": "the training step, bf16, CUDA graphs",
}


def child(loop: str, model_cfg, root: str, batch: int, n_batches: int, threads: int,
          device: str = "cpu") -> None:  # fmt: skip
    """One loop in this fresh process, warmed up, then timed; prints its images/s as JSON.
    Ours run as a stage does; the textbook loop and ``fp32-plain`` with glibc's defaults."""
    set_up_process(threads, as_stage=loop not in ("textbook", "fp32-plain"))
    torch.manual_seed(0)
    if device != "cpu":
        params = load_params("params.yaml")
        images, labels = load_split(params.data.out_dir, "train")
        precision, graphs = loop.split("-")[0], loop.endswith("-graphs")
        where = resolve_device(device)
        one = stage_step(params, model_cfg, images, labels, precision, graphs, where)
        # The same steps from the same weights in every loop: the first (compiling,
        # capturing) step timed alone, nine more to warm up, then the timed ones.
        start = time.perf_counter()
        one(0)
        synchronize(where)
        first_s = time.perf_counter() - start
        for b in range(1, 10):
            one(b)
        synchronize(where)
        start = time.perf_counter()
        losses = [one(b) for b in range(10, 10 + n_batches)]
        synchronize(where)
        rate = n_batches * batch / (time.perf_counter() - start)
        print(json.dumps({"rate": rate, "compile_s": first_s, "loss": statistics.fmean(losses)}))
        return
    if loop == "textbook":
        run = lambda n: reference(model_cfg, root, batch, n)  # noqa: E731
    else:
        images, _ = load_split(load_params("params.yaml").data.out_dir, "train")
        precision, compiled = loop.split("-")[0], loop.endswith("-compile")
        run = lambda n: ours(model_cfg, images, batch, n, precision, compiled)  # noqa: E731
    run(10)  # warm-up: oneDNN's kernels, the allocator, torch.compile's first compile
    print(json.dumps({"rate": run(n_batches), "compile_s": COMPILE_TIMES.get(loop[:4])}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--arch", default=None, help="dense or cnn (default: params.yaml)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd loops")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the stage's step there")
    parser.add_argument("--child", choices=LOOPS | DEVICE_LOOPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = load_params("params.yaml")
    model_cfg = params.model if args.arch is None else ModelConfig(arch=args.arch)
    threads = params.train.threads or max(1, available_cores())
    root, batch = ".cache/bench-torchvision", params.train.batch_size
    if args.child:
        return child(args.child, model_cfg, root, batch, args.batches, threads, args.device)
    if args.device != "cpu":
        return on_gpu(args, model_cfg, batch, threads)

    # torchvision's MNIST class reads the raw IDX files: write them from the prepared data.
    images, labels = load_split(params.data.out_dir, "train")
    raw = Path(root, "MNIST", "raw")
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images.numpy())
    write_idx(raw / "train-labels-idx1-ubyte", labels.numpy().astype("uint8"))
    write_idx(raw / "t10k-images-idx3-ubyte", images[:10].numpy())
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10].numpy().astype("uint8"))

    torch.set_num_threads(threads)  # for the matmul peak
    loops = [k for k in LOOPS if args.compile or not k.endswith("-compile")]
    # Each loop in a process of its own: process-wide settings (threads, the allocator) and a
    # heap warmed by another loop would otherwise leak between loops. The ratios are per round.
    child_args = ["--batches", str(args.batches)] + (["--arch", args.arch] if args.arch else [])
    rates, compile_s, _ = run_rounds(__file__, loops, child_args, args.rounds)
    results = {LOOPS[k]: rates[k] for k in loops}
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops = flops_per_image(build_model(model_cfg))
    print(f"cpu: {cpu_name()}; torch {torch.__version__}")
    print(
        f"arch={model_cfg.arch} z_dim={model_cfg.z_dim} batch={batch} threads={threads}"
        f" batches={args.batches}; {flops / 1e6:.1f} MFLOP per training image; matmul peak"
        f" fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s"
    )
    base = next(iter(results.values()))
    print(f"{'loop':54s} {'images/s':>8s}  {'ratio':>5s}  ratio per round  share of peak")
    for name, rates in results.items():
        rate = statistics.median(rates)
        ratios = [r / b for r, b in zip(rates, base, strict=True)]
        share = rate * flops / peak["bf16" if "bf16" in name else "fp32"]
        spread = " ".join(f"{r:.2f}" for r in ratios)
        print(
            f"{name:54s} {rate:8.0f}  {statistics.median(ratios):5.2f}x  [{spread}]"
            f"  {100 * share:4.1f} %"
        )
    for loop, seconds in compile_s.items():
        print(f"{LOOPS[loop]}: the first (compiling) step took {seconds:.1f} s")
    evaluator = Evaluator(params.evaluator.feature_dim)
    print(f"the evaluator (train-evaluator): {flops_per_image(evaluator) / 1e6:.1f} MFLOP per"
          f" training image, {params.evaluator.epochs} epochs")  # fmt: skip


def on_gpu(args, model_cfg, batch: int, threads: int) -> None:
    """The stage's step on ``args.device``, eager and as CUDA graphs, each loop in a process of
    its own, interleaved; ratios against eager fp32 of the same round."""
    device = resolve_device(args.device)
    loops = list(DEVICE_LOOPS)
    child_args = ["--batches", str(args.batches), "--device", args.device]
    child_args += ["--arch", args.arch] if args.arch else []
    rates, compile_s, losses = run_rounds(__file__, loops, child_args, args.rounds)
    peak = {t: matmul_peak(getattr(torch, t), device=args.device) for t in ("float32", "bfloat16")}
    flops = flops_per_image(build_model(model_cfg))
    print(f"{torch.cuda.get_device_name(device)}; cpu: {cpu_name()}; torch {torch.__version__}")
    print(
        f"arch={model_cfg.arch} z_dim={model_cfg.z_dim} batch={batch} threads={threads}"
        f" batches={args.batches}; {flops / 1e6:.1f} MFLOP per training image; matmul peak"
        f" fp32 {peak['float32'] / 1e12:.0f} TFLOP/s, bf16 {peak['bfloat16'] / 1e12:.0f} TFLOP/s"
    )
    print(f"{'loop':58s} {'images/s':>9s} {'ms/step':>7s}  {'ratio':>5s}  per round"
          "          first step  mean loss (per round)")  # fmt: skip
    for loop in loops:
        rate = statistics.median(rates[loop])
        ratios = [r / b for r, b in zip(rates[loop], rates["fp32"], strict=True)]
        spread = " ".join(f"{r:.2f}" for r in ratios)
        same = "identical" if len(set(losses[loop])) == 1 else "differ"
        print(
            f"{DEVICE_LOOPS[loop]:58s} {rate:9.0f} {1e3 * batch / rate:7.2f}"
            f"  {statistics.median(ratios):5.2f}x  [{spread}]  {compile_s[loop]:6.1f} s"
            f"  {losses[loop][0]:.5f} ({same})"
        )


if __name__ == "__main__":
    main()
