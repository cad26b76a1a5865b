"""params.yaml validation: a bad value fails before any work, with one line naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from bam_vae.config import ConfigError, Params, load_params

DEFAULTS = yaml.safe_load(
    (__import__("pathlib").Path(__file__).parents[1] / "params.yaml").read_text()
)


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
        ("generate.sampler=flow", ["generate.sampler", "flow", "prior", "gmm", "two-stage"]),
        ("generate.gmm.components=0", ["generate.gmm.components", "0", "greater than or"]),
        ("generate.gmm.covariance=tied", ["generate.gmm.covariance", "tied", "full", "diag"]),
        ("train.train_fraction=1.5", ["train.train_fraction", "1.5"]),
        ("train.device=tpu", ["train.device", "tpu", "auto"]),
        ("model.hidden=[64,0]", ["model.hidden.1", "0"]),
        ("data.sources=[ftp]", ["data.sources.0", "ftp", "local", "pypi"]),
        ("train.epochz=3", ["train.epochz", "unknown key"]),
        ("trian.epochs=3", ["trian", "unknown key"]),
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
        ("fit-sampler", "generate", {"sampler": "flow"}, ["generate.sampler", "'flow'", "gmm"]),
        ("fit-sampler", "generate", {"gmm": {"components": 0}}, ["generate.gmm.components", "0"]),
    ],
)
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
