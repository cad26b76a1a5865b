"""MLflow servers: the project's own UI (``bam ui``) and a team's tracking server (``bam server``).

The team server keeps runs and the model registry in PostgreSQL and proxies artifacts
(``--artifacts-destination``: a folder, or ``s3://...``), so every client logs models and
figures through it and none writes to its own disk. Exposed to other machines it serves
MLflow's basic-auth app over TLS (``--auth``, ``--ssl-certfile``); no secret is put on a
command line. Both servers are trees of processes
(uvicorn, workers) started in a process group of their own and stopped whole.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bam_vae.errors import BamError, reason, require_extra
from bam_vae.processes import stop_group
from bam_vae.tracking import store as tracking
from bam_vae.training.checkpoints import stop_on_signals
from bam_vae.uris import has_password, mask

DB_ENV = "BAM_SERVER_DB"
STORE_ENV = "MLFLOW_BACKEND_STORE_URI"  # MLflow's own: the store's URI off the command line
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL for a server's process group


def check_port(host: str, port: int) -> None:
    with socket.socket() as probe:  # MLflow's server logs a taken port but exits 0
        if probe.connect_ex((host, port)) == 0:
            raise BamError(f"--port {port}: {host}:{port} is already in use; pick another port")


def run_until_stopped(
    command: list[str], what: str, env: dict | None = None, warm: str | None = None
) -> None:
    """Run ``command`` in its own process group until it exits or we get SIGINT/SIGTERM,
    then stop the whole group, so no server is left listening. ``warm``: an MLflow server's
    local base URL, sent one runs search as soon as it answers (:func:`warm_up`)."""
    proc = subprocess.Popen(command, start_new_session=True, env=env)
    with stop_on_signals() as stopped:
        while proc.poll() is None and not stopped():
            if warm and warm_up(warm):
                warm = None
            time.sleep(0.2)
    signalled = proc.poll() is None
    stop_group(proc, STOP_GRACE_S)
    if not signalled and proc.returncode:
        raise BamError(f"the {what} exited with status {proc.returncode}; see its log above")


def warm_up(base: str) -> bool:
    """One runs search on a server without the auth app, once it answers; whether it did.

    With ``mlflow[auth]`` installed, MLflow (3.18) imports its auth module on a server's first
    runs search, lazily; the UI's first page sends several requests at once, which race on that
    import and get HTTP 500, and the page never loads. One request first settles it."""
    import ssl
    import urllib.request

    context = ssl._create_unverified_context()  # our own server, on this machine; no secret
    search = urllib.request.Request(
        f"{base}/ajax-api/2.0/mlflow/runs/search", data=b'{"experiment_ids": []}',
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=1, context=context):
            pass
    except OSError:
        return False  # not up yet
    with contextlib.suppress(OSError):
        urllib.request.urlopen(search, timeout=30, context=context).close()
    return True


# ---------------------------------------------------------------------------- bam ui
def ui_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--default-artifact-root", tracking.artifact_root().as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def serve_ui(port: int) -> None:
    """The MLflow UI on the project store until Ctrl-C or SIGTERM; with a tracking server
    URI, that server already is the team's UI, so say where instead of starting another."""
    if tracking.is_remote():
        tracking.check_server(tracking.tracking_uri())
        print(f"MLflow UI of the tracking server: {mask(tracking.tracking_uri())}")
        return
    check_port("127.0.0.1", port)
    tracking.init()  # creates the store and experiment, so a fresh checkout shows an empty one
    print(
        f"MLflow UI for {mask(tracking.tracking_uri())} at http://127.0.0.1:{port}  (Ctrl-C"
        " stops it)",
        flush=True,
    )
    env = os.environ | {STORE_ENV: tracking.tracking_uri()}  # not in argv: it may hold a password
    run_until_stopped(ui_command(port), "MLflow UI", env, warm=f"http://127.0.0.1:{port}")


# ---------------------------------------------------------------------------- bam server
def sqlalchemy_uri(db: str, option: str = "--db") -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    if db.startswith("postgresql://"):
        require_extra("psycopg", "a PostgreSQL store")
        return "postgresql+psycopg://" + db.removeprefix("postgresql://")
    if db.startswith(("postgresql+", "sqlite:///")):
        return db
    raise BamError(
        f"{option} {mask(db)!r}: expected a postgresql://USER@HOST/DATABASE URI (its password"
        " from ~/.pgpass or PGPASSWORD)"
    )


def upgrade_schema(db: str) -> None:
    """Create the tables of an empty database, or migrate an older MLflow's (idempotent): MLflow's
    own ``mlflow db upgrade``, the URI passed in the environment, not on a command line."""
    script = f"import os, mlflow.db; mlflow.db.upgrade.main([os.environ[{STORE_ENV!r}]])"
    env = os.environ | {STORE_ENV: db}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BamError(f"database {mask(db)}: {lines[-1] if lines else 'upgrade failed'}")


@dataclass(frozen=True)
class ServerOptions:
    """``bam server``'s options (the CLI's), checked by :func:`serve`."""

    db: str | None
    artifacts: str = "mlflow-artifacts"
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    auth: bool = False
    auth_db: str | None = None
    default_permission: str = "NO_PERMISSIONS"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    allowed_hosts: str | None = None
    cors_allowed_origins: str | None = None
    trusted_network: bool = False


def server_command(o: ServerOptions) -> list[str]:
    """``mlflow server``'s command line: nothing secret on it (the store's URI travels in
    ``MLFLOW_BACKEND_STORE_URI``, the auth app's settings in its ini and the environment)."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--artifacts-destination", o.artifacts,
        "--host", o.host, "--port", str(o.port), "--workers", str(o.workers),
    ]  # fmt: skip
    if o.auth:
        command += ["--app-name", "basic-auth"]
    if o.ssl_certfile:
        tls = shlex.join(["--ssl-certfile", o.ssl_certfile, "--ssl-keyfile", o.ssl_keyfile])
        command += ["--uvicorn-opts", tls]  # uvicorn's own options, passed through by MLflow
    if o.allowed_hosts:
        command += ["--allowed-hosts", o.allowed_hosts]
    if o.cors_allowed_origins:
        command += ["--cors-allowed-origins", o.cors_allowed_origins]
    return command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def check_exposure(o: ServerOptions) -> None:
    """A server other machines reach asks who is calling (``--auth``) and encrypts the
    passwords they send (TLS), unless ``--trusted-network`` says the network is private."""
    if is_loopback(o.host) or o.trusted_network:
        return
    if not o.auth:
        raise BamError(
            f"--host {o.host}: other machines could read and change every run and model without"
            " credentials; add --auth (MLflow's basic-auth app, docs/team.md), or"
            " --trusted-network on a private network you trust"
        )
    if not o.ssl_certfile:
        raise BamError(
            f"--host {o.host} with --auth: passwords would cross the network in clear text; add"
            " --ssl-certfile and --ssl-keyfile (docs/team.md#tls), or bind 127.0.0.1 behind a"
            " TLS proxy"
        )


def check_tls(o: ServerOptions) -> None:
    if bool(o.ssl_certfile) != bool(o.ssl_keyfile):
        raise BamError("--ssl-certfile and --ssl-keyfile: expected both (TLS) or neither")
    for option, path in (("--ssl-certfile", o.ssl_certfile), ("--ssl-keyfile", o.ssl_keyfile)):
        if path and not os.access(path, os.R_OK):
            raise BamError(f"{option} {path}: not a readable file; expected a PEM file")


def serve(o: ServerOptions) -> None:
    """A team's tracking server: ``o.db`` (or ``$BAM_SERVER_DB``) as the backend store,
    artifacts proxied to ``o.artifacts`` (a folder or an ``s3://`` URI); with ``o.auth``,
    MLflow's basic-auth app (:mod:`bam_vae.tracking.server_auth`)."""
    from bam_vae.tracking import server_auth

    db = o.db or os.environ.get(DB_ENV)
    if not db:
        raise BamError(f"--db: no database given; pass --db postgresql://... or set {DB_ENV}")
    if o.db and has_password(o.db):
        warn_argv("--db", o.db)
    db = sqlalchemy_uri(db)
    check_tls(o)
    check_exposure(o)
    if o.ssl_certfile:  # absolute: printed for clients, read by uvicorn
        o = replace(o, ssl_certfile=str(Path(o.ssl_certfile).resolve()),
                    ssl_keyfile=str(Path(o.ssl_keyfile).resolve()))  # fmt: skip
    check_port(o.host, o.port)
    artifacts = o.artifacts
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        try:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BamError(f"--artifacts {artifacts}: {reason(exc)}") from None
    env = os.environ | {STORE_ENV: db}
    with contextlib.ExitStack() as stack:
        if o.auth:
            env |= stack.enter_context(server_auth.configured(o, db))
        upgrade_schema(db)
        scheme = "https" if o.ssl_certfile else "http"
        clients = f"export MLFLOW_TRACKING_URI={scheme}://{o.host}:{o.port}"
        if o.ssl_certfile:
            clients += f" MLFLOW_TRACKING_SERVER_CERT_PATH={o.ssl_certfile}"
        print(
            f"MLflow tracking server on {mask(db)}, artifacts in {artifacts}"
            f"{server_auth.describe(env) if o.auth else ''}\n"
            f"  clients: {clients}   (Ctrl-C stops it)",
            flush=True,
        )
        command = server_command(replace(o, artifacts=artifacts))
        local = "127.0.0.1" if o.host in ("0.0.0.0", "::", "") else o.host
        local = f"[{local}]" if ":" in local else local
        warm = None if o.auth else f"{scheme}://{local}:{o.port}"  # auth imports it at start
        run_until_stopped(command, "tracking server", env, warm=warm)


def warn_argv(option: str, uri: str) -> None:
    print(
        f"warning: {option} {mask(uri)} carries a password, which `ps` shows to every user of"
        " this machine; put it in ~/.pgpass or PGPASSWORD and leave it out of the URI",
        file=sys.stderr,
        flush=True,
    )


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
