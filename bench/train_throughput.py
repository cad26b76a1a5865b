"""Training throughput (images/s): our in-memory loop vs the textbook torchvision loop.

Both train the same model with the same batch size, loss and optimiser, in this one process,
one after the other; the ratio is what matters (absolute numbers depend on the machine).

    python bench/train_throughput.py [--batches 150] [--arch cnn]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bam_vae.config import ModelConfig, load_params
from bam_vae.data import load_split, write_idx
from bam_vae.models import build_model, vae_loss
from bam_vae.train import configure_threads, epoch_order


def step(model, optimizer, xb, k1=0.5, k2=0.5):
    loss = vae_loss(model(xb), xb, k1, k2, "mse").total
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def ours(model_cfg, images, batch, n_batches):
    model = build_model(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images.float().div_(255.0).unsqueeze(1)
    order = epoch_order(len(x), 0, 0)
    start = time.perf_counter()
    for b in range(n_batches):
        step(model, optimizer, x[order[b * batch : (b + 1) * batch]])
    return n_batches * batch / (time.perf_counter() - start)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--arch", default=None, help="dense or cnn (default: params.yaml)")
    args = parser.parse_args()
    params = load_params("params.yaml")
    model_cfg = params.model if args.arch is None else ModelConfig(arch=args.arch)
    threads = configure_threads(params.train.threads)
    images, labels = load_split(params.data.out_dir, "train")

    # torchvision's MNIST class reads the raw IDX files: write them from the prepared data.
    root = ".cache/bench-torchvision"
    raw = __import__("pathlib").Path(root, "MNIST", "raw")
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images.numpy())
    write_idx(raw / "train-labels-idx1-ubyte", labels.numpy().astype("uint8"))
    write_idx(raw / "t10k-images-idx3-ubyte", images[:10].numpy())
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10].numpy().astype("uint8"))

    batch = params.train.batch_size
    torch.manual_seed(0)
    ours(model_cfg, images, batch, 10)  # warm-up
    results = {"reference": [], "ours": []}
    for _ in range(2):  # interleave so a noisy neighbour hurts both alike
        results["reference"].append(reference(model_cfg, root, batch, args.batches))
        results["ours"].append(ours(model_cfg, images, batch, args.batches))
    ref, our = max(results["reference"]), max(results["ours"])
    print(f"arch={model_cfg.arch} z_dim={model_cfg.z_dim} batch={batch} threads={threads}"
          f" batches={args.batches}")  # fmt: skip
    print(f"reference (torchvision MNIST + ToTensor + DataLoader): {ref:8.0f} images/s")
    print(f"bam-vae (in-memory tensor slices):                     {our:8.0f} images/s")
    print(f"speed-up: {our / ref:.2f}x")


if __name__ == "__main__":
    main()
