"""MLflow servers: the project's own UI (``bam ui``) and a team's tracking server (``bam server``).

The team server keeps runs and the model registry in PostgreSQL and proxies artifacts
(``--artifacts-destination``: a folder, or ``s3://...``), so every client logs models and
figures through it and none writes to its own disk. Both servers are trees of processes
(uvicorn, workers) started in a process group of their own and stopped whole.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bam_vae.errors import BamError, reason, require_extra
from bam_vae.processes import stop_group
from bam_vae.tracking import store as tracking
from bam_vae.training.checkpoints import stop_on_signals

DB_ENV = "BAM_SERVER_DB"
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL for a server's process group


def check_port(host: str, port: int) -> None:
    with socket.socket() as probe:  # MLflow's server logs a taken port but exits 0
        if probe.connect_ex((host, port)) == 0:
            raise BamError(f"--port {port}: {host}:{port} is already in use; pick another port")


def run_until_stopped(command: list[str], what: str, env: dict | None = None) -> None:
    """Run ``command`` in its own process group until it exits or we get SIGINT/SIGTERM,
    then stop the whole group, so no server is left listening."""
    proc = subprocess.Popen(command, start_new_session=True, env=env)
    with stop_on_signals() as stopped:
        while proc.poll() is None and not stopped():
            time.sleep(0.2)
    signalled = proc.poll() is None
    stop_group(proc, STOP_GRACE_S)
    if not signalled and proc.returncode:
        raise BamError(f"the {what} exited with status {proc.returncode}; see its log above")


# ---------------------------------------------------------------------------- bam ui
def ui_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", tracking.tracking_uri(),
        "--default-artifact-root", tracking.artifact_root().as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def serve_ui(port: int) -> None:
    """The MLflow UI on the project store until Ctrl-C or SIGTERM; with a tracking server
    URI, that server already is the team's UI, so say where instead of starting another."""
    if tracking.is_remote():
        tracking.check_server(tracking.tracking_uri())
        print(f"MLflow UI of the tracking server: {tracking.tracking_uri()}")
        return
    check_port("127.0.0.1", port)
    tracking.init()  # creates the store and experiment, so a fresh checkout shows an empty one
    print(
        f"MLflow UI for {tracking.tracking_uri()} at http://127.0.0.1:{port}  (Ctrl-C stops it)",
        flush=True,
    )
    run_until_stopped(ui_command(port), "MLflow UI")


# ---------------------------------------------------------------------------- bam server
def sqlalchemy_uri(db: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    if db.startswith("postgresql://"):
        require_extra("psycopg", "a PostgreSQL store")
        return "postgresql+psycopg://" + db.removeprefix("postgresql://")
    if db.startswith(("postgresql+", "sqlite:///")):
        return db
    raise BamError(f"--db {db!r}: expected a postgresql://user:password@host/database URI")


def upgrade_schema(db: str) -> None:
    """Create the tables of an empty database, or migrate an older MLflow's (idempotent)."""
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", db], capture_output=True, text=True
    )
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BamError(f"database {redact(db)}: {lines[-1] if lines else 'upgrade failed'}")


def redact(db: str) -> str:
    """The URI without its password, for messages."""
    head, at, tail = db.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return db
    scheme, _, user_pass = head.partition("//")
    return f"{scheme}//{user_pass.split(':', 1)[0]}:***@{tail}"


def server_command(db: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", db,
        "--artifacts-destination", artifacts,
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def serve(db: str | None, artifacts: str, host: str, port: int, workers: int) -> None:
    """A team's tracking server: ``db`` (or ``$BAM_SERVER_DB``) as the backend store,
    artifacts proxied to ``artifacts`` (a folder or an ``s3://`` URI)."""
    db = db or os.environ.get(DB_ENV)
    if not db:
        raise BamError(f"--db: no database given; pass --db postgresql://... or set {DB_ENV}")
    db = sqlalchemy_uri(db)
    check_port(host, port)
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        try:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BamError(f"--artifacts {artifacts}: {reason(exc)}") from None
    upgrade_schema(db)
    print(
        f"MLflow tracking server on {redact(db)}, artifacts in {artifacts}\n"
        f"  clients: export MLFLOW_TRACKING_URI=http://{host}:{port}   (Ctrl-C stops it)",
        flush=True,
    )
    run_until_stopped(server_command(db, artifacts, host, port, workers), "tracking server")


# ---------------------------------------------------------------------------- bam serve
def model_server_command(model_dir: Path, port: int, workers: int) -> tuple[list[str], dict]:
    """What ``mlflow models serve --env-manager local`` runs for a downloaded model folder
    (uvicorn, MLflow's environment: model path, request timeout), with the app of
    :mod:`bam_vae.serving.app` (MLflow's scoring app that also reads ``text/csv``)."""
    from mlflow.pyfunc import scoring_server

    _, env = scoring_server.get_cmd(str(model_dir), port, "127.0.0.1", None, workers)
    command = [
        sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--factory", "bam_vae.serving.app:create_app",
    ]  # fmt: skip
    return command, env


def serve_model(model_uri: str, port: int, workers: int) -> None:
    """MLflow's scoring server for ``model_uri`` (``models:/bam-vae-cnn@champion``...) from the
    project's store, on 127.0.0.1, until Ctrl-C or SIGTERM: the server ``mlflow models serve``
    runs, which also takes ``text/csv`` requests (:mod:`bam_vae.serving.app`)."""
    import tempfile

    import mlflow

    check_port("127.0.0.1", port)
    tracking.init()
    tracking.model_run_id(model_uri)  # an unknown name, version or alias: one line, now
    with tempfile.TemporaryDirectory(prefix="bam-serve-") as tmp:
        model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        print(
            f"serving {model_uri} at http://127.0.0.1:{port}/invocations  (Ctrl-C stops it)\n"
            f"  curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json'"
            """ -d '{"dataframe_records": [{"n": 16, "seed": 0}]}'""",
            flush=True,
        )
        command, env = model_server_command(model_dir, port, workers)
        run_until_stopped(command, "model server", env)
