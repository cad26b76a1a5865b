"""Every input file of every stage, corrupted in several ways: one line naming the file, a
non-zero exit (a ``BamError``), and no output file or MLflow row changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from bam_vae.config import parse_params
from bam_vae.errors import BamError
from bam_vae.stages.compute_fid import compute
from bam_vae.stages.fid_reference import reference
from bam_vae.stages.fit_sampler import fit_sampler
from bam_vae.stages.generate import generate
from bam_vae.stages.inspect import inspect
from bam_vae.stages.robustness import robustness
from bam_vae.stages.train import fit
from bam_vae.stages.train_evaluator import train_evaluator
from bam_vae.stages.tsne import tsne


class Pickled:  # any object that only unpickling could rebuild
    pass


RAW = {
    "data": {"out_dir": "data/prepared", "sources": ["package"]},
    "model": {"arch": "cnn", "z_dim": 4, "channels": [8, 16]},
    "train": {"epochs": 1, "batch_size": 64, "threads": 1},
    "evaluator": {"epochs": 1, "batch_size": 64, "feature_dim": 16, "threads": 1},
    "generate": {"n": 60, "per_class": 1, "gmm": {"components": 2}},
    "fid": {"kid_subsets": 3, "kid_subset_size": 50},
    "tsne": {"n": 100, "perplexity": 10},
    "robustness": {"n": 20},
}
PARAMS = parse_params(RAW)

STAGES = {
    "train": (fit, ["data/prepared/train.pt", "data/prepared/test.pt"]),
    "train-evaluator": (
        lambda p: train_evaluator(p.evaluator, "data/prepared"), ["data/prepared/train.pt"],
    ),
    "fid-reference": (
        lambda p: reference(p, "classifier"),
        ["models/evaluator.pt", "data/prepared/test.pt", "data/prepared/train.pt"],
    ),
    "fit-sampler": (
        fit_sampler,
        ["models/vae.pt", "models/mlflow_run.json", "data/prepared/train.pt"],
    ),
    "generate-1024": (
        generate,
        ["models/vae.pt", "models/sampler.npz", "models/mlflow_run.json", "data/prepared/test.pt"],
    ),
    "compute-fid": (
        compute,
        ["data/generated/images.npy", "data/generated/meta.json", "data/fid_ref/classifier.npy",
         "models/evaluator.pt", "models/mlflow_run.json"],
    ),
    "tsne": (tsne, ["models/vae.pt", "models/mlflow_run.json",
                                    "data/prepared/test.pt"]),
    "robustness": (
        robustness,
        ["models/vae.pt", "models/evaluator.pt", "models/mlflow_run.json", "data/prepared/test.pt"],
    ),
    "inspect": (
        inspect,
        ["data/generated/images.npy", "models/vae.pt", "models/mlflow_run.json",
         "data/prepared/train.pt", "data/prepared/test.pt"],
    ),
}  # fmt: skip


def _pickled(path: Path) -> None:
    if path.suffix == ".pt":
        torch.save({"images": Pickled(), "config": Pickled()}, path)
    elif path.suffix == ".npy":
        np.save(path, np.array([Pickled()], dtype=object), allow_pickle=True)
    elif path.suffix == ".npz":
        np.savez(path, meta=np.array([Pickled()], dtype=object))
    else:
        path.write_text('{"run_id": ')


def _wrong_content(path: Path) -> None:
    """A well-formed file of the right format holding the wrong thing."""
    if path.suffix == ".pt":
        torch.save({"images": torch.zeros(3, 5), "labels": torch.zeros(2)}, path)
    elif path.suffix == ".npy":
        np.save(path, np.zeros(7, dtype=np.float32))
    elif path.suffix == ".npz":
        np.savez(path, weights=np.zeros(3))
    else:
        path.write_text('{"unexpected": 1}')


CORRUPTIONS = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)]),
    "garbage": lambda p: p.write_bytes(b"\x00not what you think\xff" * 8),
    "pickled": _pickled,
    "wrong content": _wrong_content,
}
CASES = [
    pytest.param(stage, name, kind, id=f"{stage}:{name}:{kind}")
    for stage, (_, inputs) in STAGES.items()
    for name in inputs
    for kind in CORRUPTIONS
]


@pytest.fixture(scope="module")
def template(tiny_mnist, tmp_path_factory) -> Path:
    """A tiny project where every stage has run once."""
    root = tmp_path_factory.mktemp("template")
    (root / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(tiny_mnist, root / "data/prepared")
    cwd, saved_env = Path.cwd(), {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI",
                                                                       "DVC_ROOT")}  # fmt: skip
    os.chdir(root)
    try:
        fit(PARAMS)
        train_evaluator(PARAMS.evaluator, "data/prepared")
        reference(PARAMS, "classifier")
        fit_sampler(PARAMS)
        generate(PARAMS)
        compute(PARAMS)
        tsne(PARAMS)
        robustness(PARAMS)
        inspect(PARAMS)
    finally:
        os.chdir(cwd)
        os.environ.update({k: v for k, v in saved_env.items() if v is not None})
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file's digest (outputs, checkpoints, artifacts) and every MLflow table's rows."""
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "mlflow.db" and ".lock" not in p.name
    }
    with sqlite3.connect(root / "mlruns/mlflow.db") as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            rows = sorted(map(repr, db.execute(f"select * from {table}")))  # noqa: S608
            files[f"db:{table}"] = hashlib.sha256("".join(rows).encode()).hexdigest()
    return files


@pytest.fixture
def root(template, tmp_path, monkeypatch) -> Path:
    """A copy of the template project, as the working directory."""
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # A copied checkout's store still names the template's artifact folder: say to keep it,
    # as the refusal of such a store tells a user to (tests/test_store.py).
    monkeypatch.setenv("BAM_ARTIFACT_ROOT", str(template / "mlruns/artifacts"))
    return root


@pytest.mark.parametrize(("stage", "name", "kind"), CASES)
def test_corrupt_input_is_one_line_and_changes_nothing(stage, name, kind, root):
    CORRUPTIONS[kind](root / name)
    before = snapshot(root)
    run, _ = STAGES[stage]
    with pytest.raises(BamError) as err:
        run(PARAMS)
    message = str(err.value)
    assert "\n" not in message and name in message, message
    assert "weights_only" not in message and "Traceback" not in message, message
    assert snapshot(root) == before
    assert not list(root.rglob(".staging-*"))


DEVICE_KEYS = {
    "train": "train.device",
    "train-evaluator": "evaluator.device",
    "fid-reference": "fid.device",
    "fit-sampler": "generate.device",
    "generate-1024": "generate.device",
    "compute-fid": "fid.device",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("stage", DEVICE_KEYS)
def test_cuda_asked_on_a_machine_without_one_is_one_line(stage, root):
    key = DEVICE_KEYS[stage]
    section = key.split(".")[0]
    params = parse_params(RAW | {section: RAW.get(section, {}) | {"device": "cuda"}})
    before = snapshot(root)
    with pytest.raises(BamError, match=rf"^{key}: 'cuda' requested but no CUDA device"):
        STAGES[stage][0](params)
    assert snapshot(root) == before
