"""What the tests share besides fixtures: tiny params, subprocess environments, checkouts,
servers and their probes, PostgreSQL, the published path traversals."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import yaml

from bam_vae.config import Params, parse_params
from bam_vae.processes import group_alive

REPO = Path(__file__).resolve().parents[1]
# The VQ-VAE's code prior at test size: the default (10 epochs of 64 channels over 60 000 codes)
# takes minutes on a 2-core machine.
PIXELCNN_TINY = {"channels": 16, "layers": 2, "epochs": 1}


def write_tiny(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        blob = torch.load(src / f"{name}.pt", weights_only=True)
        torch.save({k: v[:n].clone() for k, v in blob.items()}, dst / f"{name}.pt")
    if (src / "dataset.json").is_file():
        shutil.copyfile(src / "dataset.json", dst / "dataset.json")
    return dst


def tiny_params(data_dir: Path, **sections) -> Params:
    raw = {
        "data": {"out_dir": str(data_dir), "sources": ["package"]},
        "model": {"arch": "cnn", "z_dim": 4, "channels": [8, 16]},
        "train": {"epochs": 2, "batch_size": 64, "threads": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_params(raw)


def env_with_venv() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first (bam, dvc), no foreign store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)
    # `dvc exp` commits experiments: give git an identity on machines that have none.
    for var in ("GIT_AUTHOR", "GIT_COMMITTER"):
        env.setdefault(f"{var}_NAME", "bam-vae tests")
        env.setdefault(f"{var}_EMAIL", "tests@bam-vae.invalid")
    return env


def copy_checkout(dst: Path, params: dict, dropped_stages: tuple[str, ...] = ()) -> Path:
    """This repository's tracked and not-ignored files in ``dst``, as a fresh clone has them,
    without results (no dvc.lock, no metrics), with ``params`` merged into each section."""
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
    merged = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in params.items():
        merged[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    pipeline = yaml.safe_load((dst / "dvc.yaml").read_text())
    for stage in dropped_stages:
        del pipeline["stages"][stage]
    (dst / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return dst


# ---------------------------------------------------------------------------- servers
SERVE_DEADLINE = 300  # seconds; only catches hangs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    """POST ``body`` to the model server's /invocations: (HTTP status, reply)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=SERVE_DEADLINE) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def served_images(port: int, **row) -> np.ndarray:
    """The images the server answers for one request row (asserting HTTP 200)."""
    status, reply = post(port, json.dumps({"dataframe_records": [row]}).encode())
    assert status == 200, reply
    return np.asarray(reply["predictions"], dtype=np.float32)


def wait_for_http(
    url: str, proc: subprocess.Popen, log: Path, deadline_s: float, cafile: Path | None = None
) -> None:
    """Until ``url`` answers 200 (HTTPS: trusting ``cafile``); fails with the server's log if
    it exits or never answers."""
    import ssl

    import pytest

    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[:2]} exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer on {url}:\n{log.read_text()}")


@contextlib.contextmanager
def bam_serve(model_uri: str, cwd: Path):
    """``bam serve --model model_uri`` in ``cwd``, waited for on /ping; yields its port.
    On exit: SIGTERM to its process group (as Ctrl-C), which must leave nothing behind."""
    import pytest

    port, log = free_port(), cwd / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bam", "serve", "--model", model_uri, "--port", str(port)],
            cwd=cwd, env=env_with_venv(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, SERVE_DEADLINE)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C in a terminal: bam serve stops it
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None or group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"bam serve left processes behind:\n{log.read_text()}")
        # Nothing of the server may outlive it: its uvicorn workers are in a group of their own.
        deadline = time.monotonic() + 5
        while listening(port):
            if time.monotonic() > deadline:
                pytest.fail(f"port {port} still served after bam serve stopped:\n{log.read_text()}")
            time.sleep(0.2)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------- PostgreSQL
def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    prefix = (
        ["runuser", "-u", "postgres", "--"]
        if os.geteuid() == 0
        else ["sudo", "-n", "-u", "postgres"]
    )
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True)  # fmt: skip


# Published path-traversal payloads against MLflow's tracking server (CVE-2023-1177, -6909,
# -6975, -6977, CVE-2024-1483, -1560, -1594, -3573, CVE-2026-2033, -2614, -2651): each asks
# for, or writes to, a file outside the artifact root by ``..``, its URL encodings, or an
# absolute path. ``{run}`` is a run id, ``{name}`` a registered model with version 1.
TRAVERSALS = [
    ("GET", "/get-artifact?path=../../secret.txt&run_uuid={run}"),
    ("GET", "/get-artifact?path=%2e%2e%2f%2e%2e%2fsecret.txt&run_uuid={run}"),
    ("GET", "/get-artifact?path=..%252f..%252fsecret.txt&run_uuid={run}"),
    ("GET", "/get-artifact?path={secret}&run_uuid={run}"),
    ("GET", "/model-versions/get-artifact?path=../../secret.txt&name={name}&version=1"),
    ("GET", "/ajax-api/2.0/mlflow/artifacts/list?run_id={run}&path=../.."),
    ("GET", "/ajax-api/2.0/mlflow/artifacts/list?run_id={run}&path={root}"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/../secret.txt"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/%2e%2e/secret.txt"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/..%2fsecret.txt"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts?path=../"),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/..%2fpwned.txt"),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/%2e%2e/%2e%2e/pwned.txt"),
]


def replay_traversals(uri: str, run: str, name: str, artifacts: Path) -> list[tuple[str, int]]:
    """Send :data:`TRAVERSALS` to ``uri`` whose artifact root is ``artifacts``, with a
    ``secret.txt`` beside it. Returns (request, status) of each; asserts that no reply holds
    the secret and that no ``pwned.txt`` was written outside the artifact root."""
    root = artifacts.parent
    secret = root / "secret.txt"
    secret.write_text("the-secret-of-this-machine")
    seen = []
    for method, template in TRAVERSALS:
        path = template.format(run=run, name=name, secret=secret, root=root)
        request = urllib.request.Request(f"{uri}{path}", data=b"x" if method == "PUT" else None,
                                         method=method)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, body = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        assert b"the-secret-of-this-machine" not in body, f"{method} {path} read {secret}"
        seen.append((f"{method} {path}", status))
    written = [p for p in root.parent.rglob("pwned.txt") if artifacts not in p.parents]
    assert not written, f"a PUT wrote outside the artifact root: {written}"
    return seen
