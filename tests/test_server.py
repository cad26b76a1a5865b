"""A team's setup, for real: PostgreSQL, `bam server` on it, a bare git origin, a folder as the
DVC remote, and two clones that share everything through them (issue 10)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from helpers import env_with_venv, free_port, replay_traversals, wait_for_http
from test_pipeline import copy_repo

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]
DEADLINE = 300  # seconds; only catches hangs


@pytest.fixture(scope="module")
def server(database, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port, log = free_port(), root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bam", "server", "--db", database, "--artifacts", str(root / "artifacts"),
             "--port", str(port), "--workers", "1"],
            cwd=root, env=env_with_venv(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, log, DEADLINE)
    yield {"uri": uri, "artifacts": root / "artifacts", "proc": proc, "log": log}
    if proc.poll() is None:
        proc.terminate()  # bam server stops its whole process group
        proc.wait(timeout=60)


def local_store(root: Path) -> list[str]:
    """What the clone's own MLflow store holds (git keeps an empty mlruns/.gitkeep)."""
    return [p.name for p in (root / "mlruns").rglob("*") if p.name != ".gitkeep"]


def bam(cwd: Path, *args: str, uri: str) -> subprocess.CompletedProcess:
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": uri}
    return subprocess.run(["bam", *args], cwd=cwd, env=env, capture_output=True, text=True)


def sh(cwd: Path, *cmd: str, uri: str | None = None) -> str:
    env = env_with_venv() | ({"MLFLOW_TRACKING_URI": uri} if uri else {})
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_parallel_writers_give_one_finished_run_and_one_version_each(server, tmp_path,
                                                                     tiny_mnist):  # fmt: skip
    sweep = f"parallel-{uuid.uuid4().hex[:6]}"
    procs = []
    for seed in range(4):
        root = tmp_path / f"writer{seed}"
        root.mkdir()
        (root / "dvc.yaml").write_text("stages: {}\n")
        params = {"data": {"out_dir": str(tiny_mnist)},
                  "model": {"z_dim": 4, "channels": [8, 16]},
                  "train": {"epochs": 1, "threads": 1, "seed": seed},
                  "sweep": {"name": sweep}}  # fmt: skip
        (root / "params.yaml").write_text(json.dumps(params))
        env = env_with_venv() | {"MLFLOW_TRACKING_URI": server["uri"]}
        procs.append(
            subprocess.Popen(
                ["bam", "train"],
                cwd=root,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for proc in procs:
        out = proc.communicate(timeout=DEADLINE)[0]
        assert proc.returncode == 0, out
    client = mlflow.MlflowClient(server["uri"])
    experiment = client.get_experiment_by_name("bam-vae").experiment_id
    runs = client.search_runs([experiment], f"tags.sweep = '{sweep}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    versions = [
        v for r in runs for v in client.search_model_versions(f"run_id = '{r.info.run_id}'")
    ]
    assert len(versions) == 4 and len({v.version for v in versions}) == 4


def test_runs_starting_together_share_one_dataset_row(server, tmp_path):
    """The server looks a dataset up, then inserts it: runs that start together used to fail
    on PostgreSQL's unique key (found by CI with four parallel `bam train`)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from bam_vae.datasets.base import MNIST_CLASSES, DatasetInfo
    from bam_vae.tracking import store as tracking

    info = DatasetInfo("mnist", MNIST_CLASSES)
    assert server["proc"].poll() is None, "runs before the test that stops the server"
    client = mlflow.MlflowClient(server["uri"])
    experiment = client.create_experiment(f"race-{uuid.uuid4().hex[:6]}")
    data = tmp_path / "train.pt"
    data.write_bytes(b"x")
    writers, previous = 8, mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server["uri"])  # the fluent API, as `bam train` uses it
    try:
        for round_ in range(3):  # a new dataset each round: every round races for its insert
            sha = uuid.uuid4().hex * 2
            barrier = Barrier(writers)

            def start_and_log(_: int, sha=sha, barrier=barrier) -> str:
                with mlflow.start_run(experiment_id=experiment) as run:
                    barrier.wait(timeout=DEADLINE)
                    tracking.log_dataset(data, sha, "training", 1, info)
                    return run.info.run_id

            with ThreadPoolExecutor(writers) as pool:
                run_ids = list(pool.map(start_and_log, range(writers)))
            inputs = [client.get_run(r).inputs.dataset_inputs for r in run_ids]
            assert [[i.dataset.digest for i in found] for found in inputs] == [[sha[:32]]] * 8, (
                f"round {round_}"
            )
    finally:
        mlflow.set_tracking_uri(previous)


def test_published_path_traversals_are_refused_by_bam_server(server):
    """MLflow's path-traversal advisories replayed against `bam server`: nothing outside the
    artifact root is read or written (the floor of mlflow in pyproject.toml, docs/team.md).
    Before the two-clone test, which stops the shared server."""
    client = mlflow.MlflowClient(server["uri"])
    tag = uuid.uuid4().hex[:6]
    run = client.create_run(client.create_experiment(f"traversal-{tag}")).info.run_id
    client.log_text(run, "an artifact", "a.txt")
    name = f"traversal-{tag}"
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run}/a.txt", run_id=run)
    seen = replay_traversals(server["uri"], run, name, server["artifacts"])
    assert all(status >= 400 for _, status in seen), seen


def test_two_clones_share_runs_models_data_and_experiments(server, tmp_path):
    uri = server["uri"]
    origin, remote = tmp_path / "origin.git", tmp_path / "dvc-remote"
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))

    # Clone A: the tiny pipeline against the server, then data and code to the shared places.
    a = tmp_path / "a"
    a.mkdir()
    copy_repo(a)
    sh(a, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(a, "dvc", "repro", uri=uri)
    assert local_store(a) == [], "logged to the client's disk"
    promoted = bam(a, "promote", uri=uri)
    assert promoted.returncode == 0, promoted.stderr
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "tiny pipeline")
    sh(a, "git", "remote", "add", "origin", str(origin))
    sh(a, "git", "push", "-q", "origin", "HEAD:main")
    sh(a, "dvc", "push")
    # An experiment on top (sampler only: no retraining), shared through git and the remote.
    sh(a, "dvc", "exp", "run", "--temp", "-n", "prior-sampler", "-S", "generate.sampler=prior",
       uri=uri)  # fmt: skip
    sh(a, "dvc", "exp", "push", "origin", "prior-sampler")
    # A run's artifacts went to the server's store, under the experiment's proxied location.
    ref = json.loads((a / "models/mlflow_run.json").read_text())
    assert list(server["artifacts"].rglob("vae.pt")), "the model never reached the server"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("bam-vae")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert client.get_run(ref["run_id"]).info.status == "FINISHED"

    # Clone B, elsewhere, empty caches: pull, and nothing needs to run again.
    b = tmp_path / "b"
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(origin), str(b))
    sh(b, "dvc", "pull")
    assert "up to date" in sh(b, "dvc", "status")
    sh(b, "dvc", "exp", "pull", "origin", "prior-sampler")
    assert "prior-sampler" in sh(b, "dvc", "exp", "list")
    generated = bam(b, "generate", "--model", "models:/bam-vae-cnn@champion", "--out",
                    "gen", "--figures", "gen-figures", uri=uri)  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert (b / "gen/images.npy").is_file()
    assert (bam(b, "report", uri=uri)).returncode == 0
    ui = bam(b, "ui", uri=uri)
    assert ui.returncode == 0 and uri in ui.stdout
    assert local_store(b) == []

    # Server down: one line naming the URI, within seconds, nothing written.
    server["proc"].terminate()
    server["proc"].wait(timeout=60)
    before = (b / "gen/images.npy").read_bytes()
    start = time.monotonic()
    down = bam(b, "generate", "--model", "models:/bam-vae-cnn@champion", "--out", "gen",
               uri=uri)  # fmt: skip
    assert down.returncode == 2
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0], down.stderr
    assert time.monotonic() - start < 60  # interpreter start included
    assert (b / "gen/images.npy").read_bytes() == before
