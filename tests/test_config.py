"""params.yaml validation: a bad value fails before any work, with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bam_vae.config import ConfigError, Params, load_params, load_yaml

ROOT = Path(__file__).parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid_and_match_the_report():
    params = Params.model_validate(DEFAULTS)
    assert params.model.arch == "cnn"
    assert params.model.z_dim == 16
    assert (params.train.k1, params.train.k2) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.z_dim=0", ["model.z_dim", "0", "greater than or equal to 1"]),
        ("model.z_dim=4096", ["model.z_dim", "4096", "less than or equal to 2048"]),
        ("model.arch=resnet", ["model.arch", "resnet", "dense", "cnn"]),
        ("train.k1=-1", ["train.k1", "-1", "greater than or equal to 0"]),
        ("train.epochs=two", ["train.epochs", "two", "integer"]),
        ("train.lr=0", ["train.lr", "greater than 0"]),
        ("train.recon=l1", ["train.recon", "l1", "mse", "bce", "gaussian"]),
        ("generate.sampler=glow", ["generate.sampler", "glow", "prior", "gmm", "flow"]),
        ("generate.gmm.components=0", ["generate.gmm.components", "0", "greater than or"]),
        ("generate.gmm.covariance=tied", ["generate.gmm.covariance", "tied", "full", "diag"]),
        ("train.train_fraction=1.5", ["train.train_fraction", "1.5"]),
        ("train.device=tpu", ["train.device", "tpu", "auto"]),
        ("model.hidden=[64,0]", ["model.hidden.1", "0"]),
        ("data.sources=[ftp]", ["data.sources.0", "ftp", "local", "package"]),
        ("train.epochz=3", ["train.epochz", "unknown key"]),
        ("trian.epochs=3", ["trian", "unknown key"]),
        # Strict types: no bool for a number, no string for a number, no float for an int.
        ("train.epochs=true", ["train.epochs", "true", "integer"]),
        ("train.epochs='3'", ["train.epochs", "'3'", "integer"]),
        ("train.epochs=3.0", ["train.epochs", "3.0", "integer"]),
        ("train.lr=true", ["train.lr", "true", "number"]),
        ("train.lr='1e-3'", ["train.lr", "'1e-3'", "number"]),
        ("model.intro.gamma_r=.inf", ["model.intro.gamma_r", "inf", "finite"]),
        ("generate.gmm.seed=false", ["generate.gmm.seed", "false", "integer"]),
        ("train=3", ["train", "3", "section"]),
        ("model.vq=null", ["model.vq", "null", "section"]),
    ],
)
def test_bad_value_gives_one_line_naming_key_value_and_allowed(tmp_path, override, names):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    with pytest.raises(ConfigError) as info:
        load_params(path, [override])
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_numbers_are_not_coerced_but_an_int_is_a_float(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    params = load_params(path, ["train.lr=1", "train.k2=0"])
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.k2 == 0.0
    assert load_params(path, ["train.lr=1e-3"]).train.lr == 0.001


def test_exponent_floats_without_a_dot_are_numbers_in_the_file_too(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` and `1.0e8` as strings; DVC (YAML 1.2) as numbers.
    path = tmp_path / "params.yaml"
    others = {k: v for k, v in DEFAULTS.items() if k != "robustness"}
    text = yaml.safe_dump(others).replace("lr: 0.001", "lr: 1e-3")
    path.write_text(text + "robustness:\n  gaussian_std: 5.0e-1\n  n: 1.0e3\n")
    with pytest.raises(ConfigError, match=r"robustness.n: 1000.0 is not allowed.*integer"):
        load_params(path)
    params = load_params(path, ["robustness.n=1000", "model.intro.gamma_r=1E-8"])
    assert (params.train.lr, params.evaluator.lr) == (0.001, 0.001)
    assert params.robustness.gaussian_std == 0.5
    assert params.model.intro.gamma_r == 1e-8
    assert load_params(path, ["robustness.n=1000", "sweep.name=e5"]).sweep.name == "e5"


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  arch: cnn\ntrain:\n  epochs: 3\n   lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"params file {str(path)!r} is not valid YAML at line 5, column 6:")
    assert "mapping values are not allowed" in message


def test_override_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    with pytest.raises(ConfigError) as info:
        load_params(path, ["model.hidden=[64,"])
    assert "\n" not in str(info.value)
    assert "'model.hidden=[64,'" in str(info.value) and "not valid YAML" in str(info.value)


@pytest.mark.parametrize("key", ["data.path", "fid.inception_weights"])
def test_strings_longer_than_mlflow_keeps_are_refused(tmp_path, key):
    # MLflow cuts a param at 6000 characters: the run would record another value, and a sweep
    # tag cut short would never be found by `bam report --sweep`.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    load_params(path, [f"{key}={'x' * 6000}"])  # at the limit: fine
    with pytest.raises(ConfigError) as info:
        load_params(path, [f"{key}={'x' * 6001}"])
    assert str(info.value) == (
        f"{key}: 6001 characters is too long; expected at most 6000 (MLflow's limit for a"
        " param, which would cut it)"
    )


def test_messages_never_dump_a_whole_section(tmp_path):
    path = tmp_path / "params.yaml"
    raw = {**DEFAULTS, "trian": DEFAULTS["train"]}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "'trian'" in message and "unknown key" in message
    assert "0.001" not in message and "auto" not in message  # values of the section
    assert len(message) < 200


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_params(tmp_path / "nope.yaml")


def test_override_without_equals_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_params(path, ["model.z_dim"])


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    params = load_params(path, ["model.z_dim=2", "train.lr=1e-4", "model.hidden=[64,32]"])
    assert params.model.z_dim == 2
    assert params.train.lr == pytest.approx(1e-4)
    assert params.model.hidden == [64, 32]


@pytest.mark.parametrize(
    ("stage", "section", "bad", "names"),
    [
        ("train", "model", {"z_dim": 0}, ["model.z_dim", "0"]),
        ("fit-sampler", "generate", {"sampler": "glow"}, ["generate.sampler", "'glow'", "gmm"]),
        ("fit-sampler", "generate", {"gmm": {"components": 0}}, ["generate.gmm.components", "0"]),
    ],
)
@pytest.mark.slow
def test_cli_rejects_bad_param_before_any_work_and_touches_nothing(
    tmp_path, stage, section, bad, names
):
    raw = dict(DEFAULTS)
    raw[section] = {**DEFAULTS[section], **bad}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "models").mkdir()
    keep = tmp_path / "models" / "vae.pt"
    keep.write_bytes(b"earlier result")
    done = subprocess.run(
        [sys.executable, "-m", "bam_vae", stage], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert all(name in lines[0] for name in names), lines[0]
    assert keep.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "models", "params.yaml"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--set", "train.epochs=true"], ["train.epochs", "true", "integer"]),
        (["--set", "train.lr=fast"], ["train.lr", "'fast'", "number"]),
    ],
)
@pytest.mark.slow
def test_cli_rejects_a_mistyped_override_in_one_line(tmp_path, args, names):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEFAULTS))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    done = subprocess.run(
        [sys.executable, "-m", "bam_vae", "train", *args],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert all(name in lines[0] for name in names), lines[0]
    made = sorted(p.name for p in tmp_path.iterdir() if p.name != ".cache")  # .cache: the lock
    assert made == ["dvc.yaml", "params.yaml"]


def test_a_repeated_section_is_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text + "\ntrain:\n  epochs: 3\n")
    first = 1 + text.splitlines().index("train:")
    second = len(text.splitlines()) + 2
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"duplicate key 'train' at lines {first} and {second}" in message


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n", "train.epochs", (2, 4)),
        ("model:\n  vq: {decay: 0.9, decay: 0.8}\n", "model.vq.decay", (2, 2)),
        ("fid:\n  features:\n    - {a: 1, a: 2}\n", "fid.features.0.a", (3, 3)),
    ],
)
def test_a_repeated_key_at_any_depth_is_refused(tmp_path, text, key, lines):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"duplicate key '{key}' at lines {lines[0]} and"):
        load_params(path)


def test_params_are_read_as_dvc_reads_them(tmp_path):
    # YAML 1.2 like DVC: `yes`/`on` are strings (not true), `010` is ten (not octal eight).
    from dvc.utils.serialize import parse_yaml

    text = "a: yes\nb: on\nc: 010\nd: 1e-3\ne: 0o10\nf: 1_000\ng: ~\nh: 1:30\n"
    assert load_yaml(text) == parse_yaml(text, "params.yaml")
    assert load_yaml(text) == {
        "a": "yes", "b": "on", "c": 10, "d": 0.001, "e": 8, "f": 1000, "g": None, "h": "1:30"
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  cuda_graphs: yes\n")
    with pytest.raises(ConfigError, match="train.cuda_graphs: 'yes' is not allowed.*bool"):
        load_params(path)


def test_an_override_sets_one_key_once(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    # A section given as a mapping sets only its keys; the file's others stay.
    params = load_params(path, ["train={epochs: 5}"])
    assert (params.train.epochs, params.train.lr) == (5, 0.01)
    for twice in (["train.epochs=4", "train.epochs=5"], ["train.epochs=4", "train={epochs: 5}"]):
        with pytest.raises(ConfigError) as info:
            load_params(path, twice)
        assert str(info.value) == (
            f"override {twice[1]!r} sets 'train.epochs' again (also set by 'train.epochs=4');"
            " give each key once"
        )
    with pytest.raises(ConfigError, match="override 'model={a: 1, a: 2}'.*duplicate key 'a'"):
        load_params(path, ["model={a: 1, a: 2}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.k1=0", "train.k2=0"],
            "train.k1: 0 is not allowed for model.arch=cnn (the loss is 0",
        ),
        (["train.k1=0"], "train.k1: 0 is not allowed for model.arch=cnn (only the KL term trains"),
        (["model.arch=cvae", "train.k1=0"], "train.k1: 0 is not allowed for model.arch=cvae"),
        (["train.noise_fraction=0.3"], "train.noise_std: 0 adds no noise although"),
        (["train.noise_std=0.5"], "train.noise_fraction: 0 adds no noise although"),
        (["model.arch=introvae", "train.epochs=1"], "model.intro.warmup_epochs: 1 is not allowed"),
        (["tsne.n=20", "tsne.perplexity=30"], "tsne.perplexity: 30 is not allowed with tsne.n=20"),
    ],
)
def test_settings_that_cannot_train_or_score_are_refused(tmp_path, overrides, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_weights_a_model_does_not_use_may_be_zero(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    assert load_params(path, ["model.arch=vqvae", "train.k1=0"]).train.k1 == 0  # own loss
    assert load_params(path, ["train.k2=0"]).train.k2 == 0  # a plain autoencoder


@pytest.mark.parametrize("arch", ["dense", "cnn", "cvae", "vqvae", "introvae"])
def test_every_arch_runs_with_the_shipped_params(arch):
    # README: `dvc exp run -S model.arch=<arch>` changes nothing else.
    params = load_params(ROOT / "params.yaml", [f"model.arch={arch}"])
    assert params.model.arch == arch and params.generate.sampler == "auto"


FIELDS_OF_OTHERS = [
    "model.vq.decay=0.5", "model.intro.beta_neg=64.0", "model.rae.decoder_l2=0.001",
    "model.hidden=[64]", "model.channels=[16,32]", "model.batch_norm=true",
]  # fmt: skip


@pytest.mark.parametrize("arch", ["dense", "cnn", "cvae", "vqvae", "introvae", "rae"])
def test_only_the_active_architectures_params_make_another_run(tmp_path, arch):
    """The checkpoint key and the logged params cover arch, z_dim and the fields the arch
    reads: another arch's field changes neither the key nor the network built."""
    from bam_vae.models import build_model
    from bam_vae.stages.train import run_key

    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    base = load_params(path, [f"model.arch={arch}"])
    n_params = sum(p.numel() for p in build_model(base.model, 10).parameters())
    for override in FIELDS_OF_OTHERS:
        try:
            other = load_params(path, [f"model.arch={arch}", override])
        except ConfigError:  # the vqvae refuses batch norm: it cannot differ
            continue
        field = override.split(".")[1].split("=")[0]
        used = field in base.model.USES[arch]
        assert (run_key(other, "data") != run_key(base, "data")) == used, override
        assert (other.model.active() != base.model.active()) == used, override
        if not used:  # the arch does not read it: the same network
            built = build_model(other.model, 10)
            assert sum(p.numel() for p in built.parameters()) == n_params, override
    assert set(base.model.active()) == {"arch", "z_dim", *base.model.USES[arch]}
