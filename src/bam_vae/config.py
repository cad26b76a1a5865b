"""Typed view of ``params.yaml``, validated once at the edge.

Every stage reads its section through :func:`load_params`; a bad value raises
:class:`ConfigError` with a single line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from bam_vae.errors import BamError


class ConfigError(BamError):
    """A value in params.yaml (or a --set override) is not allowed."""


class _Section(BaseModel):
    # Unknown keys are typos far more often than intentions: reject them.
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


MnistSource = Literal["local", "torchvision", "pypi"]


class DataConfig(_Section):
    raw_dir: str = Field("data/raw", description="folder with the four MNIST IDX files")
    out_dir: str = "data/mnist"
    sources: list[MnistSource] = Field(
        default_factory=lambda: ["local", "torchvision", "pypi"], min_length=1
    )
    download_timeout: float = Field(10.0, gt=0)


class VQConfig(_Section):
    """VQ-VAE (van den Oord et al. 2017): EMA codebook and the PixelCNN prior over codes."""

    codebook_size: int = Field(128, ge=2)
    code_dim: int = Field(16, ge=1)
    decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    prior_epochs: int = Field(10, ge=0)
    prior_channels: int = Field(64, ge=1)
    prior_layers: int = Field(5, ge=1)
    prior_lr: float = Field(1e-3, gt=0)


class IntroConfig(_Section):
    """Soft-IntroVAE (Daniel & Tamar 2021) weights; warm-up epochs train as a plain VAE."""

    beta_rec: float = Field(1.0, gt=0)
    beta_kl: float = Field(1.0, gt=0)
    beta_neg: float = Field(256.0, gt=0)
    gamma_r: float = Field(1e-8, ge=0)
    warmup_epochs: int = Field(1, ge=0)


Arch = Literal["dense", "cnn", "cvae", "vqvae", "introvae"]


class ModelConfig(_Section):
    arch: Arch = "cnn"
    z_dim: int = Field(16, ge=1, le=2048)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 128], min_length=1)
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [32, 64], min_length=2, max_length=2
    )
    vq: VQConfig = Field(default_factory=VQConfig)
    intro: IntroConfig = Field(default_factory=IntroConfig)


class _Fit(_Section):
    """What every trained network here needs: an optimiser schedule, a seed, a machine."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads; 0 = cores / parallel workers")


class TrainConfig(_Fit):
    k1: float = Field(0.5, ge=0)
    k2: float = Field(0.5, ge=0)
    recon: Literal["mse", "bce", "gaussian"] = "mse"
    train_fraction: float = Field(1.0, gt=0, le=1)
    noise_fraction: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0)
    sweep: str = Field("", description="tag put on the MLflow run, groups runs of one sweep")


class EvaluatorConfig(_Fit):
    """The MNIST classifier used as FID feature space and digit judge (trained once)."""

    epochs: int = Field(3, ge=1)
    feature_dim: int = Field(128, ge=8)


class GmmConfig(_Section):
    """Gaussian mixture on the posterior means (Ghosh et al. 2020, ex-post density estimation)."""

    components: int = Field(50, ge=1, le=1000)
    covariance: Literal["full", "diag"] = "full"
    max_iter: int = Field(200, ge=1)
    seed: int = Field(0, ge=0)


class TwoStageConfig(_Section):
    """The second, small VAE of Dai & Wipf 2019, fitted to the posterior means."""

    hidden: int = Field(256, ge=8)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


Sampler = Literal["prior", "gmm", "two-stage"]


class GenerateConfig(_Section):
    n: int = Field(1024, ge=1)
    seed: int = Field(0, ge=0)
    per_digit: int = Field(2, ge=1, le=20, description="test images per digit in the recon figure")
    sampler: Sampler = "gmm"
    max_dim: int = Field(32, ge=1, le=2048, description="above this z_dim, fit in a PCA of it")
    gmm: GmmConfig = Field(default_factory=GmmConfig)
    two_stage: TwoStageConfig = Field(default_factory=TwoStageConfig)


FeatureSpace = Literal["classifier", "inception"]


class FidConfig(_Section):
    features: list[FeatureSpace] = Field(default_factory=lambda: ["classifier"], min_length=1)
    inception_weights: str | None = None
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    confidence: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)


class TsneConfig(_Section):
    n: int = Field(5000, ge=10, le=10_000)
    perplexity: float = Field(30.0, gt=0)
    seed: int = Field(0, ge=0)


class RobustnessConfig(_Section):
    n: int = Field(1000, ge=10)
    gaussian_mean: float = 0.5
    gaussian_std: float = Field(0.5, gt=0)
    confidence: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)


class Params(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    fid: FidConfig = Field(default_factory=FidConfig)
    tsne: TsneConfig = Field(default_factory=TsneConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r} in params (value {value!r}); check the spelling"
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; expected one of {err['ctx']['expected']}"
    expected = err["msg"].removeprefix("Input should be ").removeprefix("List should have ")
    return f"{key}: {value!r} is not allowed; expected {expected}"


def parse_params(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not allowed; expected KEY=VALUE, e.g. model.z_dim=16"
        )
    key, value = item.split("=", 1)
    # YAML parsing makes `--set train.lr=1e-3` a float and `--set model.hidden=[64,32]` a list.
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"params file {str(path)!r} not found; expected a YAML file of stage sections"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"params file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file {str(path)!r} must map section names to sections")
    return parse_params(apply_overrides(raw, overrides or []))
