"""`bam ui` serves the project store; a real headless Chromium reads a run's FID from it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

import mlflow
import pytest
from helpers import env_with_venv, free_port, replay_traversals, wait_for_http

from bam_vae.tracking import store as tracking

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def store(project):
    """Two scored training runs in the project's own store."""
    experiment_id = tracking.init()
    runs = {}
    for z_dim, fid in ((2, 41.25), (16, 12.75)):
        with mlflow.start_run(run_name=f"cnn-z{z_dim}") as run:
            mlflow.log_params({"model.arch": "cnn", "model.z_dim": z_dim})
            mlflow.log_metric("fid_classifier", fid)
        runs[run.info.run_id] = fid
    return project, experiment_id, runs


def test_mlflow_ui_shows_runs_and_their_fid(store):
    if CHROMIUM is None:
        pytest.skip("no chromium browser installed (apt-get install chromium); UI not tested")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    project, experiment_id, runs = store
    port = free_port()
    server = subprocess.Popen(
        ["bam", "ui", "--port", str(port)], cwd=project, env=env_with_venv(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        first = server.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("MLflow UI did not answer within 90 s")

        args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]  # fmt: skip
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            page = browser.new_page()
            base = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
            page.goto(f"{base}/runs")
            page.get_by_text("cnn-z2").first.wait_for(timeout=60_000)
            page.get_by_text("cnn-z16").first.wait_for(timeout=10_000)
            run_id, fid = next(iter(runs.items()))
            page.goto(f"{base}/runs/{run_id}")
            page.get_by_text("fid_classifier").first.wait_for(timeout=60_000)
            assert str(fid) in page.content()
            browser.close()
        # A second UI on the same port says so in one line instead of exiting 0.
        again = subprocess.run(
            ["bam", "ui", "--port", str(port)],
            cwd=project,
            env=env_with_venv(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 2 and "already in use" in again.stderr, again.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
    # SIGTERM stops the whole UI: nothing is left listening on the port.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_published_path_traversals_are_refused_by_bam_ui(store, tmp_path):
    """The same advisories against `bam ui` on the project's own store."""
    project, _, runs = store
    run = next(iter(runs))
    client = tracking.client()
    client.log_text(run, "an artifact", "a.txt")
    client.create_registered_model("traversal")
    client.create_model_version("traversal", f"runs:/{run}/a.txt", run_id=run)
    port, log = free_port(), tmp_path / "ui.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["bam", "ui", "--port", str(port)], cwd=project, env=env_with_venv(), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", server, log, 90)
        seen = replay_traversals(uri, run, "traversal", tracking.artifact_root())
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert all(status >= 400 for _, status in seen), seen
