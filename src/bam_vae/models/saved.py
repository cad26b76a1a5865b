"""A model's file: ``{"config", "state_dict"}`` of plain tensors (``weights_only`` loading,
nothing unpickled), rebuilt from its config. The VAE saves and loads itself here, beside
``build_model``; the evaluator's file uses the same :func:`load_saved_model`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bam_vae.errors import BamError, reason
from bam_vae.files import load_tensors, save_torch


def _names(items: list[str]) -> str:
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return ", ".join(items[:3]) + more


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(str(n) for n in tensor.shape) or "scalar"


def load_saved_model(
    path: str | Path,
    kind: str,
    hint: str,
    build: Callable[[dict], torch.nn.Module],
    before_build: Callable[[dict, dict], None] | None = None,
) -> tuple[Any, dict]:
    """A model saved as ``{"config", "state_dict"}`` (plain tensors, so ``weights_only``),
    rebuilt by ``build(config)`` on the CPU in eval mode; returns (model, config).
    ``before_build(config, state_dict)``, if given, is called first: it brings a file written
    by an earlier version of bam-vae up to date, in place, or raises for a file that holds
    no model (its errors pass through as they are).

    A missing or corrupt file is a one-line error naming it, with ``hint`` on how to remake it:
    never torch's or pydantic's own multi-line text.
    """
    from pydantic import ValidationError

    from bam_vae.config import describe_validation_error

    blob = load_tensors(path, kind, hint)

    def corrupt(why: str) -> BamError:
        return BamError(f"corrupt {kind} file {path}: {' '.join(why.split())}; {hint}")

    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        found = f"a {type(blob).__name__}"
        if isinstance(blob, dict):
            found = f"keys {_names([str(k) for k in blob])}" if blob else "no keys"
        raise corrupt(f"expected the keys config and state_dict, found {found}")
    config, saved = blob["config"], blob["state_dict"]
    if not isinstance(config, dict) or not isinstance(saved, dict):
        raise corrupt("its config and state_dict must both be dictionaries")
    if before_build is not None:
        before_build(config, saved)
    try:
        model = build(config)
    except ValidationError as exc:
        why = describe_validation_error(exc, "its config")
        raise corrupt(f"its config is not valid ({why})") from None
    except BamError as exc:
        raise corrupt(f"its config is not valid ({exc})") from None
    except Exception as exc:
        raise corrupt(f"cannot build a model from its config ({reason(exc)})") from None

    # Compare names and shapes first: load_state_dict's own error is many lines of internals.
    built = model.state_dict()
    missing = [k for k in built if k not in saved]
    unexpected = [str(k) for k in saved if k not in built]
    not_tensors = [k for k in built if k in saved and not isinstance(saved[k], torch.Tensor)]
    shapes = [
        f"{k}: saved {_dims(saved[k])} vs built {_dims(built[k])}"
        for k in built
        if k in saved and k not in not_tensors and saved[k].shape != built[k].shape
    ]
    problems = [
        f"{label}{_names(items)}"
        for label, items in (
            ("missing keys: ", missing),
            ("unexpected keys: ", unexpected),
            ("not tensors: ", not_tensors),
            ("shape mismatch for ", shapes),
        )
        if items
    ]
    if problems:
        raise corrupt(f"its weights do not match its config ({'; '.join(problems)})")
    try:
        model.load_state_dict(saved)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Error(s) in loading")]
        raise corrupt(f"its weights cannot be loaded ({lines[0] if lines else exc})") from None
    return model.eval(), config


def save_model(model: torch.nn.Module, cfg: Any, path: Path) -> None:
    """A VAE and its ``ModelConfig`` as ``{"config", "state_dict"}``: plain tensors. A
    conditional model's config also holds its ``n_classes`` (the dataset's)."""
    save_torch({"config": model_config(model, cfg), "state_dict": model.state_dict()}, path)


def model_config(model: Any, cfg: Any) -> dict:
    """``cfg`` as saved with ``model``: plus ``n_classes`` for a conditional model."""
    extra = {"n_classes": model.n_classes} if model.conditional else {}
    return cfg.model_dump() | extra


def build_saved(config: dict) -> Any:
    """The VAE a saved config describes (``n_classes`` absent: MNIST's 10)."""
    from bam_vae.config import ModelConfig
    from bam_vae.models import build_model

    rest = {k: v for k, v in config.items() if k != "n_classes"}
    return build_model(ModelConfig.model_validate(rest), int(config.get("n_classes", 10)))


def load_model(path: str | Path) -> tuple[Any, Any]:
    """(VAE in eval mode on the CPU, ``ModelConfig``) from ``models/vae.pt`` (plain tensors +
    config: safe with ``weights_only=True``)."""
    from bam_vae.config import ModelConfig

    hint = "run `bam train` (or `dvc repro`)"
    model, config = load_saved_model(path, "model", hint, build_saved, _upgrade_model)
    config.pop("n_classes", None)
    return model, ModelConfig.model_validate(config)


# The VQ-VAE's PixelCNN prior was part of the model until it became sampler ``pixelcnn``.
_MOVED_VQ_KEYS = ("prior_epochs", "prior_channels", "prior_layers", "prior_lr")


def _upgrade_model(config: dict, state_dict: dict) -> None:
    """Models saved before the PixelCNN prior moved out of the VQ-VAE: its params left
    ``model.vq`` (every arch saved them) and its weights the state dict (a VQ-VAE's own
    weights are unchanged; fit ``pixelcnn`` with ``bam fit-sampler`` to sample from it)."""
    vq = config.get("vq")
    if isinstance(vq, dict):
        for key in _MOVED_VQ_KEYS:
            vq.pop(key, None)
    for key in [k for k in state_dict if isinstance(k, str) and k.startswith("prior.")]:
        del state_dict[key]
