"""End to end: the real `dvc repro` and `dvc exp run` in a temporary copy of this repository."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, env_with_venv

pytestmark = pytest.mark.slow

TINY = {
    "data": {"sources": ["pypi"]},
    "model": {"z_dim": 3},
    "train": {"epochs": 1, "train_fraction": 0.005, "batch_size": 64},
}


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def copy_repo(dst: Path) -> Path:
    """Tracked and not-ignored files only, as a fresh clone would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    (dst / "dvc.lock").unlink(missing_ok=True)
    for path in (dst / "metrics").glob("*"):
        path.unlink()
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], commit):
        run(cmd, dst)
    return dst


def mlflow_rows(root: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return db.execute(sql).fetchall()


def test_repro_then_nothing_then_a_temp_experiment(tmp_path):
    root = copy_repo(tmp_path)
    run(["dvc", "repro"], root)
    outputs = ["data/mnist/train.pt", "data/mnist/test.pt", "metrics/data.json", "models/vae.pt"]
    outputs += ["models/mlflow_run.json", "metrics/train.json", "metrics/train_history.csv"]
    for out in outputs:
        assert (root / out).is_file(), out
    assert mlflow_rows(root, "select name, version from model_versions") == [("bam-vae-cnn", 1)]
    assert len(mlflow_rows(root, "select run_uuid from runs")) == 1

    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again
    assert len(mlflow_rows(root, "select run_uuid from runs")) == 1

    shown = run(["dvc", "metrics", "show", "--json"], root)
    assert "test_loss" in shown

    run(["dvc", "exp", "run", "--temp", "-S", "model.z_dim=2"], root)
    runs = mlflow_rows(root, "select run_uuid, status from runs")
    assert len(runs) == 2 and {s for _, s in runs} == {"FINISHED"}
    z_dims = mlflow_rows(root, "select value from params where key='model.z_dim' order by value")
    assert z_dims == [("2",), ("3",)]
    names = mlflow_rows(root, "select value from tags where key='dvc_exp_name'")
    assert sorted(n for (n,) in names)[0] == ""  # the plain repro
    assert any(n for (n,) in names)  # the experiment carries its DVC name
    assert len(mlflow_rows(root, "select version from model_versions")) == 2
    exp_show = run(["dvc", "exp", "show", "--json"], root)
    assert "test_loss" in exp_show
