"""Every failure leaves the workspace and the MLflow store as they were (issue 9).

Real subprocesses and real signals where a signal is the point; the rest in-process.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import env_with_venv

from bam_vae.datasets import data_sha256, load_split
from bam_vae.errors import BamError
from bam_vae.files import exclusive
from bam_vae.stages.generate import generate
from bam_vae.stages.train import fit, run_key
from bam_vae.tracking import store as tracking
from bam_vae.training.checkpoints import checkpoint_path

DEADLINE = 300  # seconds; only catches hangs


def digests(root: Path, names) -> dict[str, bytes]:
    return {n: (root / n).read_bytes() for n in names if (root / n).is_file()}


def runs(status: str | None = None):
    query = f"attributes.status = '{status}'" if status else ""
    return tracking.client().search_runs([tracking.init()], query)


# ---------------------------------------------------------------------------- generate
GENERATE_OUTPUTS = ["data/generated/images.npy", "data/generated/meta.json",
                    "figures/samples.png", "figures/reconstructions.png"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["missing test split", "empty MLflow store"])
def test_failed_generate_keeps_the_previous_samples(
    breakage, project, tiny, tiny_mnist, tmp_path, monkeypatch
):
    data = tmp_path / "data-copy"
    data.mkdir()
    for name in ("train.pt", "test.pt"):
        (data / name).write_bytes((tiny_mnist / name).read_bytes())
    params = tiny(data={"out_dir": str(data)}, generate={"sampler": "prior", "n": 16})
    fit(params)
    generate(params)
    before = digests(project, GENERATE_OUTPUTS)
    assert len(before) == len(GENERATE_OUTPUTS)
    if breakage == "missing test split":
        (data / "test.pt").unlink()
        match = "test.pt"
    else:  # what a fresh clone + `dvc pull` looks like: outputs, but an empty store
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
        match = "generate: MLflow run .* is gone from .*not in this store"
    with pytest.raises(BamError, match=match) as err:
        generate(params.model_copy(update={"generate": params.generate.model_copy(
            update={"seed": 1})}))  # fmt: skip
    assert "\n" not in str(err.value)
    assert digests(project, GENERATE_OUTPUTS) == before
    assert not list(project.rglob(".staging-*"))


# ---------------------------------------------------------------------------- train
@pytest.mark.slow
def test_corrupt_resume_checkpoint_is_set_aside_and_training_starts_over(project, tiny, capsys):
    params = tiny()
    expected = fit(params)
    images, _ = load_split(params.data.out_dir, "train")
    tests, _ = load_split(params.data.out_dir, "test")
    path = checkpoint_path(run_key(params, data_sha256(images, tests)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    assert fit(params) == expected  # same numbers as a run with no checkpoint at all
    err = capsys.readouterr().err
    kept = list(path.parent.glob(f"{path.name}.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"PK\x03\x04 truncated"
    # Full words: the file, what is wrong and what happens next (no torch internals).
    assert (
        f"warning: train: the resume checkpoint {path} cannot be used: it is truncated or not a"
        f" complete torch file. It is kept as {kept[0]} and train starts over from the first"
        " epoch.\n"
    ) in err


@pytest.mark.slow
def test_orphan_run_of_the_same_params_is_marked_killed(project, tiny):
    params = tiny()
    images, _ = load_split(params.data.out_dir, "train")
    tests, _ = load_split(params.data.out_dir, "test")
    key = run_key(params, data_sha256(images, tests))
    tracking.init()
    orphan = mlflow.start_run(tags={"bam_run_key": key})  # as a SIGKILLed process leaves it
    mlflow.end_run("RUNNING")  # detach without finishing: status stays RUNNING
    assert tracking.client().get_run(orphan.info.run_id).info.status == "RUNNING"
    fit(params)
    assert tracking.client().get_run(orphan.info.run_id).info.status == "KILLED"
    assert not runs("RUNNING")


def test_a_second_process_on_the_same_checkpoint_fails_at_once(project, tiny):
    params = tiny()
    images, _ = load_split(params.data.out_dir, "train")
    tests, _ = load_split(params.data.out_dir, "test")
    path = checkpoint_path(run_key(params, data_sha256(images, tests)))
    lock = path.with_name(f"{path.name}.lock")
    with exclusive(lock, "held"), pytest.raises(BamError, match=r"in use by pid \d+"):
        fit(params)
    assert not runs()  # no MLflow run was started


def test_unreachable_tracking_server_fails_fast_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    start = time.monotonic()
    with pytest.raises(BamError, match=f"http://127.0.0.1:{port}.*unreachable") as err:
        tracking.check_server(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- subprocesses
def write_project(root: Path, tiny_mnist: Path, **train) -> Path:
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = {
        "data": {"out_dir": str(tiny_mnist), "sources": ["package"]},
        "model": {"arch": "cnn", "z_dim": 4, "channels": [8, 16]},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1} | train,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def bam(root: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bam", *args], cwd=root, env=env_with_venv() | {"PYTHONUNBUFFERED": "1"} | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line]


def wait_for_line(proc: subprocess.Popen, needle: str) -> list[str]:
    seen, deadline = [], time.monotonic() + DEADLINE
    for line in proc.stdout:
        seen.append(line)
        if needle in line or time.monotonic() > deadline:
            return seen
    pytest.fail(f"no {needle!r} in output:\n{''.join(seen)}\n{proc.stderr.read()}")


def store_runs(root: Path):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("bam-vae").experiment_id])


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_during_export_then_rerun_gives_one_finished_run_and_one_version(
    tmp_path, tiny_mnist
):
    root = write_project(tmp_path, tiny_mnist, epochs=1)
    done = bam(root, "train")
    out, err = done.communicate(timeout=DEADLINE)
    assert done.returncode == 0, out + err
    outputs = ["models/vae.pt", "models/mlflow_run.json", "metrics/train.json",
               "metrics/train_history.csv"]  # fmt: skip
    before = digests(root, outputs)

    write_project(root, tiny_mnist, epochs=2)
    proc = bam(root, "train")
    wait_for_line(proc, "epoch 2/2:")  # the loop is over: export and registration follow
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, out + err
    assert len(errors(err)) == 1 and "interrupted" in errors(err)[0], err
    assert digests(root, outputs) == before, "outputs changed by an interrupted run"
    client, found = store_runs(root)
    assert sorted(r.info.status for r in found) == ["FINISHED", "KILLED"]
    killed = next(r.info.run_id for r in found if r.info.status == "KILLED")

    again = bam(root, "train")
    out, err = again.communicate(timeout=DEADLINE)
    assert again.returncode == 0, out + err
    client, found = store_runs(root)
    assert sorted(r.info.status for r in found) == ["FINISHED", "FINISHED"], out + err
    assert client.get_run(killed).info.status == "FINISHED"  # the same run, finished
    versions = client.search_model_versions("name = 'bam-vae-cnn'")
    # One version per run: a stop after registering never registers twice.
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in found)


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_mid_epoch_loses_little_and_the_rerun_resumes_the_same_run(tmp_path, tiny_mnist):
    root = write_project(tmp_path, tiny_mnist, epochs=3, batch_size=4)
    proc = bam(root, "train", BAM_CHECKPOINT_SECONDS="0")  # a checkpoint after every batch
    deadline = time.monotonic() + DEADLINE
    checkpoints = root / ".cache/checkpoints"
    while not list(checkpoints.glob("train-*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    (ckpt,) = checkpoints.glob("train-*.pt")
    saved = torch.load(ckpt, weights_only=True)["state"]
    assert saved["epoch"] == 0 and saved["batch"] >= 1  # mid-epoch, not only at epoch ends
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=DEADLINE)
    _, found = store_runs(root)
    assert [r.info.status for r in found] == ["RUNNING"]

    again = bam(root, "train")
    out, err = again.communicate(timeout=DEADLINE)
    assert again.returncode == 0, out + err
    assert "resuming from" in out
    _, after = store_runs(root)
    assert [(r.info.run_id, r.info.status) for r in after] == [(found[0].info.run_id, "FINISHED")]


@pytest.mark.e2e
@pytest.mark.slow
def test_second_writer_in_the_same_checkout_fails_naming_the_first(tmp_path, tiny_mnist):
    root = write_project(tmp_path, tiny_mnist, epochs=50)
    first = bam(root, "train")
    wait_for_line(first, "epoch 1/50:")
    second = bam(root, "generate")
    out, err = second.communicate(timeout=DEADLINE)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=DEADLINE)
    assert second.returncode == 2, out + err
    (line,) = errors(err)
    assert f"pid {first.pid} (bam train" in line and "in use" in line


@pytest.mark.e2e
@pytest.mark.slow
def test_train_against_a_dead_tracking_server_fails_in_seconds(tmp_path, tiny_mnist):
    root = write_project(tmp_path, tiny_mnist)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    proc = bam(root, "train", MLFLOW_TRACKING_URI=uri)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 2
    (line,) = errors(err)
    assert uri in line and "unreachable" in line
    assert time.monotonic() - start < 60  # startup included; MLflow alone retried for minutes
    assert not (root / "models").exists() and not (root / "mlruns").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_an_error_mid_epoch_gets_a_line_of_its_own(tmp_path, tiny_mnist):
    root = write_project(tmp_path, tiny_mnist, lr=1.0e9)  # diverges within the first epoch
    proc = bam(root, "train")
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 2, out + err
    # What a terminal shows: the text after the last carriage return of each line.
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.strip()]
    (line,) = [s for s in shown if "error" in s]
    assert line.startswith("error: train: loss is nan"), err


def _library_exceptions() -> list[tuple[str, BaseException, str]]:
    """A real exception of each library whose errors reach `bam` (issue 49), with a password
    in its text where the library puts the URI there."""
    import optuna
    import psycopg
    import sqlalchemy
    from mlflow.exceptions import RestException

    url = "postgresql://bam:s3cret-pw@db.lan/optuna"
    return [
        ("optuna", optuna.exceptions.StorageInternalError(f"cannot commit to {url}"),
         "the study (Optuna): StorageInternalError"),
        ("sqlalchemy", sqlalchemy.exc.OperationalError("select 1", {}, Exception(f"{url} down")),
         "a database (SQLAlchemy): OperationalError"),
        ("psycopg", psycopg.OperationalError(f"connection to {url} failed: password authentication"
                                             " failed for user \"bam\""),
         "PostgreSQL (psycopg): OperationalError"),
        ("mlflow", RestException({"error_code": "INTERNAL_ERROR", "message": "store broke"}),
         "the MLflow store sqlite:///"),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["optuna", "sqlalchemy", "psycopg", "mlflow"])
def test_a_library_exception_reaching_bam_is_one_line_with_no_password(kind, project, capsys):
    """bam's error boundary (cli._run), as every command meets it: Optuna's, SQLAlchemy's,
    psycopg's and MLflow's REST client's exceptions are one line naming what failed; with
    BAM_TRACEBACK=1 the traceback comes back."""
    import typer

    from bam_vae import cli

    _, exc, says = next(case for case in _library_exceptions() if case[0] == kind)

    def command() -> None:
        raise exc

    with pytest.raises(typer.Exit) as done:
        cli._run(command, False)
    assert done.value.exit_code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "BAM_TRACEBACK=1" in lines[0], lines
    assert "s3cret-pw" not in lines[0]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BAM_TRACEBACK", "1")
        with pytest.raises(type(exc)):
            cli._run(command, False)
