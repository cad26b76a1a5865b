"""MLflow: one SQLite store inside the project, one run per trained model, a registry version.

The store is ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``, both under the real
project root (``DVC_ROOT`` inside ``dvc exp run --temp/--queue`` copies), so every experiment,
wherever DVC runs it, lands in the same place. ``MLFLOW_TRACKING_URI`` overrides the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from filelock import FileLock
from mlflow.tracking import MlflowClient

from bam_vae.checkpoints import stop_on_signals
from bam_vae.errors import BamError
from bam_vae.paths import project_root, write_json

EXPERIMENT = "bam-vae"
RUN_REF = Path("models/mlflow_run.json")

# MLflow logs every alembic migration and registry step at INFO; keep stage output readable.
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def store_dir() -> Path:
    return project_root() / "mlruns"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


def artifact_root() -> Path:
    return store_dir() / "artifacts"


@contextmanager
def store_lock() -> Iterator[None]:
    """Serialise schema creation and registry writes between parallel queue workers.

    SQLite allows one writer; MLflow's first-use migrations and model registration are
    multi-statement and fail with "database is locked" or duplicate rows when two
    ``dvc queue`` workers race. Metric logging is short and goes unlocked.
    """
    store_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(store_dir() / ".store.lock"), timeout=600):
        yield


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A remote tracking URI must answer its health check within seconds.

    MLflow's client retries an unreachable server with backoff for minutes before it fails
    with a long traceback; this asks once, up front, before any work is done."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
            ok = reply.status == 200
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BamError(
            f"MLFLOW_TRACKING_URI {uri}: tracking server unreachable ({reason}); start it or"
            " unset MLFLOW_TRACKING_URI to use the project's own store"
        ) from None
    if not ok:
        raise BamError(f"MLFLOW_TRACKING_URI {uri}: health check answered {reply.status}")


_checked: set[str] = set()


def init(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project store and return the experiment id (created if new)."""
    uri = tracking_uri()
    if uri not in _checked:
        check_server(uri)
        _checked.add(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock():
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # Explicit: MLflow's default artifact location is relative to the working directory.
            artifact_root().mkdir(parents=True, exist_ok=True)
            experiment_id = mlflow.create_experiment(
                experiment,
                artifact_location=artifact_root().as_uri(),
                # Opens the UI on "Training runs" rather than MLflow 3's GenAI overview.
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.strip()
    return os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def run_tags(data_sha256: str, sweep: str, run_key: str) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "bam_run_key": run_key,  # model + train params + data: finds orphans of a crash
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,  # shown by the MLflow UI
        "data_sha256": data_sha256,
    }
    if sweep:
        tags["sweep"] = sweep
    if os.environ.get("BAM_PARENT_RUN_ID"):  # a trial of `bam sweep`: a child of its run
        tags["mlflow.parentRunId"] = os.environ["BAM_PARENT_RUN_ID"]
    return tags


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def registered_name(arch: str) -> str:
    return f"bam-vae-{arch}"


def log_generator(
    generator: torch.nn.Module, example: tuple[np.ndarray, ...], arch: str
) -> tuple[str, str]:
    """Log a model's generator as a ``pt2`` exported program and register it.

    ``pt2`` (torch.export) loads without unpickling any code. Input examples have a batch of
    two, which keeps the batch dimension dynamic. Returns (model uri, version).
    """
    run_id = mlflow.active_run().info.run_id
    # A rerun after a stop between registration and the end of the stage: reuse that version.
    for found in client().search_model_versions(f"run_id = '{run_id}'"):
        if found.name == registered_name(arch):
            return found.source, str(found.version)
    info = mlflow.pytorch.log_model(
        generator.eval().cpu(),
        name="generator",
        serialization_format="pt2",
        input_example=example if len(example) > 1 else example[0],
        # Explicit requirements skip MLflow's slow import-tracing inference.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
        ],
    )
    with store_lock():
        version = mlflow.register_model(info.model_uri, registered_name(arch))
    return info.model_uri, str(version.version)


def run_exists(run_id: str) -> bool:
    try:
        client().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def settle_orphans(run_key: str, keep: str) -> list[str]:
    """Mark KILLED the runs of ``run_key`` left RUNNING by a crash or SIGKILL (not ``keep``).

    Called while holding that key's lock, so no live process owns them."""
    orphans = client().search_runs(
        [init()], f"tags.bam_run_key = '{run_key}' and attributes.status = 'RUNNING'"
    )
    settled = [r.info.run_id for r in orphans if r.info.run_id != keep]
    for run_id in settled:
        client().set_terminated(run_id, status="KILLED")
        print(f"train: run {run_id} was left RUNNING by a crashed process; marked KILLED")
    return settled


def write_run_ref(path: Path, **ref: str) -> None:
    write_json(path, ref)


def read_run_ref(path: Path = RUN_REF) -> dict[str, str]:
    """The MLflow run a trained model belongs to, written by ``train`` for later stages."""
    if not path.is_file():
        raise BamError(f"MLflow run file {path} not found; run `bam train` (or `dvc repro`) first")
    try:
        ref = json.loads(path.read_text())
        ref["run_id"]  # noqa: B018 - fail here, not deep in a later stage
    except (ValueError, KeyError, TypeError) as exc:
        raise BamError(f"corrupt MLflow run file {path}: {exc}") from None
    return ref


@contextmanager
def reopen_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Log a later stage's results into the MLflow run of the model it scores."""
    init()
    if not run_exists(run_id):
        raise BamError(
            f"MLflow run {run_id} (from {RUN_REF}) is not in {tracking_uri()}; restore that"
            " store (or point MLFLOW_TRACKING_URI at it), or retrain with `dvc repro`"
        )
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def model_run_id(model_uri: str) -> str:
    """The run that logged a registered model (``models:/name/3``, ``models:/name@alias``)."""
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise BamError(
            f"model {model_uri!r} not found in {tracking_uri()}: {exc}".splitlines()[0]
        ) from None
    return info.run_id


def download_artifact(run_id: str, artifact_path: str) -> Path:
    """One artifact of a run (e.g. ``checkpoint/vae.pt``, ``sampler/gmm.npz``), downloaded."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path))
    except Exception as exc:
        raise BamError(
            f"run {run_id} has no {artifact_path} artifact: {exc}".splitlines()[0]
        ) from None


def ui_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", tracking_uri(),
        "--default-artifact-root", artifact_root().as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def serve_ui(port: int) -> None:
    """Run the MLflow UI on the project store until interrupted (Ctrl-C or SIGTERM).

    The UI is a tree of processes (uvicorn, job runners); it gets a process group of its own,
    and the whole group is stopped with this command, so no server is left listening.
    """
    with socket.socket() as probe:  # MLflow's server logs a taken port but exits 0
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise BamError(f"--port {port}: 127.0.0.1:{port} is already in use; pick another port")
    init()  # creates the store and experiment, so a fresh checkout shows an empty experiment
    print(
        f"MLflow UI for {tracking_uri()} at http://127.0.0.1:{port}  (Ctrl-C stops it)", flush=True
    )
    ui = subprocess.Popen(ui_command(port), start_new_session=True)
    with stop_on_signals() as stopped:
        while ui.poll() is None and not stopped():
            time.sleep(0.2)
    if ui.poll() is None:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        return
    if ui.returncode:
        raise BamError(f"the MLflow UI exited with status {ui.returncode}; see its log above")
