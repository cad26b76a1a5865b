"""Typed view of ``params.yaml``, validated once at the edge.

Every stage reads its section through :func:`load_params`; a bad value raises
:class:`ConfigError` with a single line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bam_vae.errors import BamError


class ConfigError(BamError):
    """A value in params.yaml (or a --set override) is not allowed."""


MLFLOW_PARAM_LIMIT = 6000  # characters of one MLflow param value


class _Section(BaseModel):
    # Unknown keys are typos far more often than intentions: reject them. Strict types: no
    # bool where a number goes (`epochs: true` is not 1 epoch), no string for a number, no
    # float for an int; an int for a float is still fine (`lr: 1`). No inf/nan anywhere.
    # MLflow keeps a param up to 6000 characters (a tag 8000) and cuts longer ones silently, so
    # a longer string would be logged as another value than the run used.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
        str_max_length=MLFLOW_PARAM_LIMIT,
    )  # fmt: skip


DataSource = Literal["local", "torchvision", "package"]
# Named datasets (src/bam_vae/datasets/) and the user's own data in three formats.
Dataset = Literal[
    "mnist", "fashion-mnist", "kmnist", "emnist-balanced", "emnist-letters", "emnist-digits",
    "idx", "npz", "images",
]  # fmt: skip
USER_FORMATS = ("idx", "npz", "images")


class DataConfig(_Section):
    dataset: Dataset = "mnist"
    # Named datasets: an optional folder of their four IDX files, tried first (source local).
    # idx | npz | images: the user's folder or file. A dvc.yaml dependency either way.
    path: str = "data/raw"
    name: str = Field(
        "", max_length=40, pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="idx | npz | images: the dataset's name (registered models, runs);"
        " default the file or folder name",
    )  # fmt: skip
    out_dir: str = "data/prepared"
    sources: list[DataSource] = Field(
        default_factory=lambda: ["local", "torchvision", "package"], min_length=1
    )
    download_timeout: float = Field(10.0, gt=0)
    # images only: a single folder of class subfolders is split into train/test by this
    # seeded rule (share of each class held out as test images).
    test_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    # images only: other sizes are resized to 28 x 28 (PIL, Lanczos, antialiased); false
    # refuses them instead.
    resize: bool = True


class VQConfig(_Section):
    """VQ-VAE (van den Oord et al. 2017): EMA codebook (its code prior is a sampler)."""

    codebook_size: int = Field(128, ge=2)
    code_dim: int = Field(16, ge=1)
    decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)


class IntroConfig(_Section):
    """Soft-IntroVAE (Daniel & Tamar 2021) weights; warm-up epochs train as a plain VAE."""

    beta_rec: float = Field(1.0, gt=0)
    beta_kl: float = Field(1.0, gt=0)
    beta_neg: float = Field(256.0, gt=0)
    gamma_r: float = Field(1e-8, ge=0)
    warmup_epochs: int = Field(1, ge=0)


class RAEConfig(_Section):
    """RAE (Ghosh et al. 2020): L2 on the decoder's weights; the code penalty is train.k2."""

    decoder_l2: float = Field(3.9e-5, ge=0)  # coefficient of sum(theta^2); 0: RAE without it


Arch = Literal["dense", "cnn", "cvae", "vqvae", "introvae", "rae"]
Device = Literal["auto", "cpu", "cuda"]  # auto: the GPU where there is one


class ModelConfig(_Section):
    arch: Arch = "cnn"
    z_dim: int = Field(16, ge=1, le=2048)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 128], min_length=1)
    # Conv nets: one 4x4 stride-2 convolution per entry (3-4 pad the image to 32 x 32 first).
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [32, 64], min_length=2, max_length=4
    )
    batch_norm: bool = False  # conv nets but the VQ-VAE's: after every (transposed) convolution
    vq: VQConfig = Field(default_factory=VQConfig)
    intro: IntroConfig = Field(default_factory=IntroConfig)
    rae: RAEConfig = Field(default_factory=RAEConfig)

    # The fields each architecture reads (models/__init__.py builds it from them).
    USES: ClassVar[dict[str, tuple[str, ...]]] = {
        "dense": ("hidden",),
        "cnn": ("channels", "batch_norm"),
        "cvae": ("channels", "batch_norm"),
        "rae": ("channels", "batch_norm", "rae"),
        "vqvae": ("channels", "vq"),
        "introvae": ("channels", "batch_norm", "intro"),
    }

    def active(self) -> dict[str, Any]:
        """``arch``, ``z_dim`` and the active architecture's own fields (as pythae keeps one
        config per model): what the checkpoint key and the MLflow params cover, so that
        ``-S model.vq.decay=0.5`` does not make a ``cnn`` another run. The saved file keeps
        the whole section."""
        dumped = self.model_dump(mode="json")
        return {k: dumped[k] for k in ("arch", "z_dim", *self.USES[self.arch])}


class _Fit(_Section):
    """What every trained network here needs: an optimiser schedule, a seed, a machine."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)
    device: Device = "auto"
    threads: int = Field(0, ge=0, description="torch threads; 0 = cores / parallel workers")
    # fp32: the reference numerics. bf16: autocast to bfloat16 (weights, optimiser and loss
    # stay fp32) with channels-last convolutions: faster where the CPU has bf16 units
    # (bench/train_throughput.py).
    precision: Literal["fp32", "bf16"] = "fp32"


class TrainConfig(_Fit):
    k1: float = Field(0.5, ge=0)
    k2: float = Field(0.5, ge=0)
    recon: Literal["mse", "bce", "gaussian"] = "mse"
    # cosine: every optimiser's rate decays from train.lr to 0 over the run's steps
    # (Loshchilov & Hutter 2017, without restarts); constant: train.lr throughout.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # > 0: the weights saved, scored and sampled are their exponential moving average over
    # steps with this decay (torch's AveragedModel); 0: the last step's weights.
    ema: float = Field(0.0, ge=0, lt=1)
    train_fraction: float = Field(1.0, gt=0, le=1)
    noise_fraction: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0)
    # CUDA only: each training step runs as captured CUDA graphs (torch.compile's
    # "reduce-overhead"); a GPU step of these small nets is bound by kernel launches.
    cuda_graphs: bool = False


class EvaluatorConfig(_Fit):
    """The dataset's classifier used as FID feature space and class judge (trained once)."""

    epochs: int = Field(3, ge=1)
    feature_dim: int = Field(128, ge=8)


class GmmConfig(_Section):
    """Gaussian mixture on the posterior means (Ghosh et al. 2020, ex-post density estimation)."""

    components: int = Field(100, ge=1, le=1000)
    covariance: Literal["full", "diag"] = "full"
    max_iter: int = Field(200, ge=1)
    # EM sees a seeded random subset of at most this many latents (per class for cvae): with
    # the PCA cap on dimensions, this keeps a fit under a minute whatever z_dim is.
    max_points: int = Field(30_000, ge=1)
    seed: int = Field(0, ge=0)


class TwoStageConfig(_Section):
    """The second, small VAE of Dai & Wipf 2019, fitted to the posterior means."""

    hidden: int = Field(256, ge=8)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


class FlowConfig(_Section):
    """A neural spline flow (Durkan et al. 2019; zuko) fitted to the posterior means."""

    transforms: int = Field(3, ge=1)
    hidden: int = Field(128, ge=8)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


class PixelCnnConfig(_Section):
    """The VQ-VAE's autoregressive code prior (van den Oord et al. 2016, 2017), fitted to the
    codes of the training images."""

    channels: int = Field(64, ge=1)
    layers: int = Field(5, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


# auto: the arch's own default (gmm for continuous latents, pixelcnn for the VQ-VAE's codes)
Sampler = Literal["auto", "prior", "gmm", "two-stage", "flow", "pixelcnn"]


class GenerateConfig(_Section):
    n: int = Field(1024, ge=1)
    seed: int = Field(0, ge=0)
    per_class: int = Field(2, ge=1, le=20, description="test images per class in the recon figure")
    sampler: Sampler = "auto"
    max_dim: int = Field(32, ge=1, le=2048, description="above this z_dim, fit in a PCA of it")
    gmm: GmmConfig = Field(default_factory=GmmConfig)
    two_stage: TwoStageConfig = Field(default_factory=TwoStageConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    pixelcnn: PixelCnnConfig = Field(default_factory=PixelCnnConfig)
    # fit-sampler and generate-1024 encode and decode here; latents are drawn on the CPU with
    # the seeded generator either way, so both devices decode the same latents.
    device: Device = "auto"


FeatureSpace = Literal["classifier", "inception"]


class FidConfig(_Section):
    features: list[FeatureSpace] = Field(default_factory=lambda: ["classifier"], min_length=1)
    inception_weights: str | None = None
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    floor_n: int = Field(10_000, ge=2)  # training images of the FID floor (fid-reference)
    confidence: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)
    # Inception features only: bf16 is faster (bench/inception_throughput.py); fp32 is the
    # reference protocol.
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Device = "auto"  # fid-reference and compute-fid: both feature networks
    # RAE's published protocol (Ghosh et al. 2020's code): MNIST zero-padded to 32 x 32 before
    # Inception, generated images scored as 8-bit (as a saved PNG). 28 / false: as today.
    pad_to: int = Field(28, ge=28, le=299)
    quantize: bool = False


class TsneConfig(_Section):
    n: int = Field(5000, ge=10, le=10_000)
    perplexity: float = Field(30.0, gt=0)
    seed: int = Field(0, ge=0)


class InspectConfig(_Section):
    rows: int = Field(8, ge=1, le=64)  # samples shown beside their nearest training images
    pairs: int = Field(6, ge=1, le=32)  # pairs of test images interpolated
    steps: int = Field(10, ge=2, le=32)  # decoded points per interpolation and traversal
    dims: int = Field(8, ge=1, le=64)  # latent dimensions traversed
    seed: int = Field(0, ge=0)


class RobustnessConfig(_Section):
    n: int = Field(1000, ge=10)
    gaussian_mean: float = 0.5
    gaussian_std: float = Field(0.5, gt=0)
    confidence: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)


class SweepConfig(_Section):
    """A label, not a hyperparameter: no stage declares this section in dvc.yaml, so the same
    point in two sweeps is one DVC run-cache entry; ``train`` puts it on its MLflow run."""

    name: str = Field("", max_length=200, description="MLflow tag `sweep` of the runs trained")


class Params(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    fid: FidConfig = Field(default_factory=FidConfig)
    tsne: TsneConfig = Field(default_factory=TsneConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    inspect: InspectConfig = Field(default_factory=InspectConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)


class DuplicateKeyError(YAMLError):
    """A key given twice in one mapping: YAML forbids it, and most readers keep the last."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _first_duplicate(node: Node, path: tuple[str, ...] = ()) -> str | None:
    """``duplicate key 'train.epochs' at lines 3 and 9`` for the first repeated key, if any."""
    if isinstance(node, MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, ScalarNode) else "<complex key>"
            line = key.start_mark.line + 1
            if name == "<<":  # a merge key (`<<: *defaults`) may repeat
                continue
            if name in lines:
                dotted = ".".join((*path, name))
                return (
                    f"duplicate key {dotted!r} at lines {lines[name]} and {line}; give each key"
                    " once (a second section would replace the first, dropping its other keys)"
                )
            lines[name] = line
            found = _first_duplicate(value, (*path, name))
            if found:
                return found
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            found = _first_duplicate(item, (*path, str(i)))
            if found:
                return found
    return None


def load_yaml(text: str) -> Any:
    """Plain data (dicts, lists, scalars) from YAML 1.2 text, read as DVC reads params.yaml.

    ruamel.yaml's safe loader (DVC's own reader), so ``1e-3`` is a float, ``yes``/``on`` are
    strings and ``010`` is ten in both. A key repeated in any mapping raises
    :class:`DuplicateKeyError` naming the dotted key and both lines: YAML forbids it, and a
    reader that keeps the last one would silently drop the first section's other keys.
    """
    reader = YAML(typ="safe", pure=True)
    node = reader.compose(text)
    duplicate = node is not None and _first_duplicate(node)
    if duplicate:
        raise DuplicateKeyError(duplicate)
    return reader.load(text)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = 6
_short.maxlevel = 2


def _show(value: Any) -> str:
    """A value for a one-line message: short, never a whole section; YAML's true/null."""
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:4])
        more = f" and {len(value) - 4} more" if len(value) > 4 else ""
        return f"a section with keys {keys}{more}" if value else "an empty section"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return _short.repr(value)


def _describe(err: dict[str, Any], where: str = "params") -> str:
    key = ".".join(str(p) for p in err["loc"]) or where
    value = _show(err.get("input"))
    kind = err["type"]
    if kind == "extra_forbidden":
        value = value if isinstance(err.get("input"), dict) else f"value {value}"
        return f"unknown key {key!r} in {where} ({value}); check the spelling"
    if kind == "literal_error":
        return f"{key}: {value} is not allowed; expected one of {err['ctx']['expected']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: {value} is not allowed; expected a section of `key: value` lines"
    if kind == "string_pattern_mismatch":  # data.name: it names registered models
        return (
            f"{key}: {value} is not allowed; expected lower-case letters, digits and '-',"
            " starting with a letter or digit"
        )
    if kind == "string_too_long" and err["ctx"]["max_length"] == MLFLOW_PARAM_LIMIT:
        return (
            f"{key}: {len(err['input'])} characters is too long; expected at most"
            f" {MLFLOW_PARAM_LIMIT} (MLflow's limit for a param, which would cut it)"
        )
    expected = err["msg"].removeprefix("Input should be ").removeprefix("List should have ")
    return f"{key}: {value} is not allowed; expected {expected}"


def describe_validation_error(exc: ValidationError, where: str = "params") -> str:
    """One line for a pydantic error: the first bad key, its value and what is allowed.

    ``where`` names what was validated, for unknown keys ("params", "its config", ...).
    """
    errors = exc.errors()
    if not errors:
        return f"{where} is not valid"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
    return " ".join(_describe(errors[0], where).split()) + (more if len(errors) > 1 else "")


# Archs whose loss is ``k1 * reconstruction + k2 * KL`` (RAE: k2 weighs its code penalty; the
# VQ-VAE and IntroVAE have their own).
K_WEIGHTED = ("dense", "cnn", "cvae", "rae")


def degenerate_setting(params: Params) -> str | None:
    """Why these params cannot train or score anything meaningful, in one line (else None).

    Each value is allowed alone; together they make training unable to change the model,
    or make a setting silently do nothing."""
    train, arch = params.train, params.model.arch
    if arch in K_WEIGHTED and train.k1 == 0:
        what = "the loss is 0" if train.k2 == 0 else "only the KL term trains"
        return (
            f"train.k1: 0 is not allowed for model.arch={arch} ({what} and the decoder gets no"
            " gradient); expected k1 > 0"
        )
    model = params.model
    if arch == "vqvae" and (len(model.channels) != 2 or model.batch_norm):
        return (
            f"model.channels: {model.channels} with batch_norm={model.batch_norm} is not allowed"
            " for model.arch=vqvae (its code grid is 7 x 7); expected two channels, no batch norm"
        )
    if (train.noise_fraction > 0) != (train.noise_std > 0):
        zero = "noise_std" if train.noise_fraction > 0 else "noise_fraction"
        other = "noise_fraction" if zero == "noise_std" else "noise_std"
        return (
            f"train.{zero}: 0 adds no noise although train.{other}={getattr(train, other)};"
            f" expected both > 0 (noisy training images) or both 0"
        )
    if arch == "introvae" and params.model.intro.warmup_epochs >= train.epochs:
        return (
            f"model.intro.warmup_epochs: {params.model.intro.warmup_epochs} is not allowed with"
            f" train.epochs={train.epochs} (it would train a plain VAE); expected fewer"
            " warm-up epochs than train.epochs"
        )
    if params.tsne.perplexity >= params.tsne.n:
        return (
            f"tsne.perplexity: {params.tsne.perplexity:g} is not allowed with"
            f" tsne.n={params.tsne.n}; expected a perplexity below the number of points"
        )
    return None


def parse_params(raw: dict[str, Any]) -> Params:
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    why = degenerate_setting(params)
    if why:
        raise ConfigError(why)
    return params


def _yaml_problem(exc: YAMLError) -> str:
    """Where and what, on one line: `` at line L, column C: <problem>`` (1-based)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    problem = " ".join(str(problem or exc or type(exc).__name__).split())
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return f": {problem}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not allowed; expected KEY=VALUE, e.g. model.z_dim=16"
        )
    key, value = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(
            f"override {item!r}: {key.strip()!r} is not a key; expected e.g. model.z_dim"
        )
    # YAML parsing makes `--set train.lr=1e-3` a float and `--set model.hidden=[64,32]` a list.
    try:
        return path, load_yaml(value)
    except YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML{_yaml_problem(exc)}"
        ) from None


def _leaves(value: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, str(k)))]
    return [path]


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key]``; a section given as a mapping sets only the keys it names."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge(node[key], k, v)
    else:
        node[key] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items applied to the params read from the file.

    A mapping value (``--set 'train={epochs: 3}'``) sets only the keys it names, as the
    dotted form does; a key set twice (also through a mapping) is an error, not "last wins"."""
    given: dict[tuple[str, ...], str] = {}
    for item in overrides:
        path, value = _parse_override(item)
        for leaf in _leaves(value, tuple(path)):
            clash = next((g for g in given if g[: len(leaf)] == leaf or leaf[: len(g)] == g), None)
            if clash is not None:
                raise ConfigError(
                    f"override {item!r} sets {'.'.join(leaf)!r} again (also set by"
                    f" {given[clash]!r}); give each key once"
                )
            given[leaf] = item
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        _merge(node, path[-1], value)
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"params file {str(path)!r} not found; expected a YAML file of stage sections"
        )
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"params file {str(path)!r} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    except YAMLError as exc:
        raise ConfigError(
            f"params file {str(path)!r} is not valid YAML{_yaml_problem(exc)}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file {str(path)!r} must map section names to sections")
    return parse_params(apply_overrides(raw, overrides or []))
