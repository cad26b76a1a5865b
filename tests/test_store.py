"""A store outside the checkout keeps the artifacts with it, never inside another checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from bam_vae.errors import BamError
from bam_vae.stages.generate import generate
from bam_vae.stages.train import fit
from bam_vae.tracking import store as tracking


def checkout(path: Path) -> Path:
    path.mkdir()
    (path / "dvc.yaml").write_text("stages: {}\n")
    return path


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_checkouts_sharing_a_sqlite_store_keep_artifacts_with_the_store(project, tiny, monkeypatch):
    shared = project / "shared"
    a, b = checkout(project / "A"), checkout(project / "B")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared / 'mlflow.db'}")
    monkeypatch.chdir(b)
    fit(tiny(train={"epochs": 1}))
    monkeypatch.chdir(a)
    fit(tiny(train={"epochs": 1, "seed": 1}))
    assert not (a / "mlruns").exists() and not (b / "mlruns").exists()
    run_a = tracking.client().get_model_version("bam-vae-cnn", "2").run_id
    assert (shared / "artifacts").is_dir()
    assert mlflow.get_run(run_a).info.artifact_uri.startswith((shared / "artifacts").as_uri())

    shutil.rmtree(b)
    params = tiny(generate={"sampler": "prior", "n": 8})
    generate(params, model_uri="models:/bam-vae-cnn/2", out_dir=a / "o", fig_dir=a / "o")
    assert np.load(a / "o/images.npy").shape == (8, 28, 28)
    assert not b.exists()  # nothing re-created in the deleted checkout


def test_artifact_root_is_where_the_user_says(project, tiny, monkeypatch):
    monkeypatch.setenv("BAM_ARTIFACT_ROOT", str(project / "elsewhere"))
    fit(tiny(train={"epochs": 1}))
    assert files_under(project / "elsewhere")
    assert not (project / "mlruns/artifacts").exists()


def test_a_store_keeping_artifacts_in_another_checkout_is_refused(project, monkeypatch):
    # As an older bam-vae left a shared store: its location fixed inside the first checkout.
    shared = project / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared / 'mlflow.db'}")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    other = (project / "B/mlruns/artifacts").as_uri()
    mlflow.create_experiment("bam-vae", artifact_location=other)
    with pytest.raises(BamError) as info:
        tracking.init()
    assert str(info.value) == (
        f"experiment 'bam-vae' in sqlite:///{shared / 'mlflow.db'} keeps its artifacts in"
        f" {other}, not with the store ({shared / 'artifacts'}); set BAM_ARTIFACT_ROOT="
        f"{project / 'B/mlruns/artifacts'} to keep writing there, or point MLFLOW_TRACKING_URI"
        " at a new store"
    )
    assert not (project / "B").exists()
    monkeypatch.setenv("BAM_ARTIFACT_ROOT", str(project / "B/mlruns/artifacts"))
    tracking.init()  # the user said so


def test_a_database_without_a_server_needs_an_artifact_root(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://bam@127.0.0.1/bam")
    with pytest.raises(BamError, match="a database without a tracking server has no place"):
        tracking.artifact_root()
