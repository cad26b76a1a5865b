"""Shared fixtures: real MNIST prepared once per test session, tiny slices of it, an empty
project, a PostgreSQL database. Helpers the tests import live in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from helpers import as_postgres, tiny_params, write_tiny

from bam_vae.config import DataConfig
from bam_vae.machine import available_cores
from bam_vae.stages.prepare import prepare


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist) the N workers split the cores, as `dvc queue`
    workers do: torch here and every stage they start (``BAM_PARALLEL_JOBS``) takes its share,
    since two processes that each take every core run many times slower than one alone."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("BAM_PARALLEL_JOBS", workers)
        torch.set_num_threads(max(1, available_cores() // int(workers)))


# The files that take longest under ``-n auto`` on 2 cores, longest first (docs/speed.md, "The
# test suite").
LONGEST_FILES = (
    "test_pipeline.py",
    "test_sweep.py",
    "test_datasets_pipeline.py",
    "test_server.py",
    "test_evaluator.py",
)


def pytest_collection_modifyitems(items):
    """The longest files run first, then the other files with end-to-end (``e2e``) tests, then
    those with ``slow`` ones: under ``-n`` each file runs whole on one worker (``--dist
    loadfile``) and workers take the next file as they finish, so a long one started late
    ends the run alone while the other cores idle (longest-processing-time-first)."""
    marked = {
        name: {i.path for i in items if i.get_closest_marker(name)} for name in ("e2e", "slow")
    }
    rank = {name: n for n, name in enumerate(LONGEST_FILES)}

    def key(item):
        return (
            rank.get(item.path.name, len(rank)),
            item.path not in marked["e2e"],
            item.path not in marked["slow"],
        )

    items.sort(key=key)  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The full, real MNIST prepared from the package-index copy (cached per machine)."""
    out = tmp_path_factory.mktemp("mnist")
    prepare(DataConfig(out_dir=str(out), sources=["package"]), metrics_path=out / "data.json")
    return out


@pytest.fixture(scope="session")
def tiny_mnist(mnist_dir, tmp_path_factory) -> Path:
    """The first 512 training and 256 test images: enough to train for a few steps."""
    return write_tiny(mnist_dir, tmp_path_factory.mktemp("tiny"), 512, 256)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project root: MLflow store, checkpoints and outputs all land in tmp_path."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("BAM_ARTIFACT_ROOT", raising=False)
    return tmp_path


@pytest.fixture
def tiny(tiny_mnist):
    """Build tiny Params over the tiny data: ``tiny(model={...}, train={...})``."""
    return lambda **sections: tiny_params(tiny_mnist, **sections)


@pytest.fixture(scope="module")
def database():
    """A fresh database on the machine's PostgreSQL 15 (started if it is not running)."""
    if not shutil.which("pg_ctlcluster"):
        pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql")
    subprocess.run(["pg_ctlcluster", "15", "main", "start"], capture_output=True)
    ready = as_postgres("psql", "-tAc", "select 1")
    assert ready.returncode == 0, ready.stderr
    as_postgres("psql", "-c", "create role bam login password 'bam'")  # may exist already
    name = f"bam_test_{uuid.uuid4().hex[:8]}"
    made = as_postgres("createdb", "-O", "bam", name)
    assert made.returncode == 0, made.stderr
    yield f"postgresql://bam:bam@127.0.0.1:5432/{name}"
    as_postgres("dropdb", "--if-exists", "--force", name)
