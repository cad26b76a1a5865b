"""A team's tracking server that lets in only its members, for real: PostgreSQL 15, `bam server
--auth` (MLflow's basic-auth app, users in a database of their own) over TLS with a self-signed
certificate, users made with MLflow's own auth client, and what each member may do, through
`bam` commands and raw REST (issue 48)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import uuid
from pathlib import Path

import mlflow
import mlflow.server
import pytest
import requests
from helpers import as_postgres, env_with_venv, free_port, wait_for_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]
DEADLINE = 300  # seconds; only catches hangs
PASSWORDS = {"admin": secrets.token_urlsafe(18), "alice": "alice-" + secrets.token_urlsafe(12),
             "bob": "bob-" + secrets.token_urlsafe(12)}  # fmt: skip


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, as docs/team.md makes one."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def team(database, tmp_path_factory):
    """`bam server --auth` with TLS, its own auth database, clients allowed as `localhost`."""
    root = tmp_path_factory.mktemp("team")
    cert, key = certificate(root)
    name = database.rsplit("/", 1)[1]
    made = as_postgres("createdb", "-O", "bam", f"{name}_auth")
    assert made.returncode == 0, made.stderr
    port, log = free_port(), root / "server.log"
    # Passwords through libpq (PGPASSWORD) and MLflow's own variable, never in argv.
    env = env_with_venv() | {"PGPASSWORD": "bam", "XDG_CONFIG_HOME": str(root / "config"),
                             "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"]}  # fmt: skip
    db = f"postgresql://bam@127.0.0.1:5432/{name}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bam", "server", "--db", db, "--auth", "--auth-db", f"{db}_auth",
             "--artifacts", str(root / "artifacts"), "--port", str(port), "--workers", "1",
             "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
             "--allowed-hosts", f"localhost:{port}"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    uri = f"https://localhost:{port}"
    wait_for_http(f"{uri}/health", proc, log, DEADLINE, cafile=cert)
    yield {"uri": uri, "port": port, "cert": cert, "proc": proc, "log": log, "root": root}
    if proc.poll() is None:
        proc.terminate()  # bam server stops its whole process group
        proc.wait(timeout=60)
    as_postgres("dropdb", "--if-exists", "--force", f"{name}_auth")


@contextlib.contextmanager
def as_user(team, name: str | None, password: str | None = None):
    """MLflow's client in this process, authenticated the MLflow way (its variables)."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_SERVER_CERT_PATH")  # fmt: skip
    before = {k: os.environ.get(k) for k in keys}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(team["uri"])  # the fluent API too (models:/ URIs)
    os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(team["cert"])
    for key, value in zip(keys[:2], (name, password or PASSWORDS.get(name or "")), strict=True):
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    try:
        yield mlflow.MlflowClient(team["uri"])
    finally:
        mlflow.set_tracking_uri(previous)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client_env(team, name: str | None, password: str | None = None, **extra) -> dict:
    env = env_with_venv() | {"MLFLOW_TRACKING_URI": team["uri"],
                             "MLFLOW_TRACKING_SERVER_CERT_PATH": str(team["cert"])}  # fmt: skip
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    if name:
        env["MLFLOW_TRACKING_USERNAME"] = name
        env["MLFLOW_TRACKING_PASSWORD"] = password or PASSWORDS[name]
    return env | extra


def bam(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bam", *args], cwd=cwd, env=env, capture_output=True, text=True)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused command (rc 2, no traceback)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def project(root: Path, tiny_mnist: Path, seed: int) -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = {"data": {"out_dir": str(tiny_mnist)}, "model": {"z_dim": 4, "channels": [8, 16]},
              "train": {"epochs": 1, "threads": 1, "seed": seed}}  # fmt: skip
    (root / "params.yaml").write_text(json.dumps(params))
    return root


def rest(team, method: str, endpoint: str, auth: tuple[str, str] | None, **body):
    return requests.request(method, f"{team['uri']}{endpoint}", json=body or None, auth=auth,
                            verify=str(team["cert"]), timeout=30)  # fmt: skip


def test_members_get_what_they_were_granted_and_nothing_more(team, tmp_path, tiny_mnist):
    uri = team["uri"]
    with as_user(team, "admin") as admin:
        users = mlflow.server.get_app_client("basic-auth", tracking_uri=uri)
        users.create_user("alice", PASSWORDS["alice"])
        users.create_user("bob", PASSWORDS["bob"])

    # Anonymous: 401, and nothing is created or deleted.
    created = rest(team, "POST", "/api/2.0/mlflow/experiments/create", None, name="anon")
    assert created.status_code == 401
    work = tmp_path / "anonymous"
    work.mkdir()
    refused = one_line(bam(work, client_env(team, None), "report"))
    assert uri in refused and "HTTP 401" in refused and "MLFLOW_TRACKING_USERNAME" in refused

    # Alice trains twice: her experiment and her registered model (MANAGE on both).
    alice_dir = project(tmp_path / "alice", tiny_mnist, 0)
    for seed in (0, 1):
        done = bam(alice_dir, client_env(team, "alice"), "train", "-s", f"train.seed={seed}")
        assert done.returncode == 0, done.stdout + done.stderr
    with as_user(team, "admin") as admin:
        assert admin.get_experiment_by_name("anon") is None
        experiment = admin.get_experiment_by_name("bam-vae").experiment_id
        runs = admin.search_runs([experiment])
        versions = admin.search_model_versions("name = 'bam-vae-cnn'")
        assert len(runs) == 2 and len(versions) == 2
        # Scores as compute-fid tags them; version 1 the champion for now.
        for version, fid in (("1", 5.0), ("2", 3.0)):
            admin.set_model_version_tag("bam-vae-cnn", version, "gmm/fid_classifier", str(fid))
            admin.set_model_version_tag("bam-vae-cnn", version, "gmm/n_generated", "1024")
        admin.set_registered_model_alias("bam-vae-cnn", "champion", "1")
        users.grant_user_permission("bob", "experiment", experiment, "READ")
        users.grant_user_permission("bob", "registered_model", "bam-vae-cnn", "READ")
    run_id = runs[0].info.run_id

    # Wrong password: one line, nothing trained.
    bob_dir = project(tmp_path / "bob", tiny_mnist, 0)
    wrong = one_line(bam(bob_dir, client_env(team, "bob", "not-bobs-password"), "train"))
    assert "'bob'" in wrong and "HTTP 401" in wrong and uri in wrong

    # Bob reads: the report, the UI, her registered generator.
    report = bam(bob_dir, client_env(team, "bob"), "report")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "not logged to MLflow" in report.stdout
    assert run_id in (bob_dir / "reports" / "runs.md").read_text()
    bob = ("bob", PASSWORDS["bob"])
    page = requests.get(f"{uri}/", auth=bob, verify=str(team["cert"]), timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert requests.get(f"{uri}/", verify=str(team["cert"]), timeout=30).status_code == 401
    seen = rest(team, "GET", f"/ajax-api/2.0/mlflow/runs/get?run_id={run_id}", bob)
    assert seen.status_code == 200 and seen.json()["run"]["info"]["run_id"] == run_id
    with as_user(team, "bob") as as_bob:
        import pandas as pd

        generator = mlflow.pyfunc.load_model("models:/bam-vae-cnn@champion")
        images = generator.predict(pd.DataFrame({"n": [2], "seed": [0]}))
        assert len(images) == 2

        # Bob may not change anything of hers: each refusal is a 403 and nothing changes.
        with pytest.raises(mlflow.exceptions.MlflowException) as denied:
            as_bob.create_model_version("bam-vae-cnn", f"runs:/{run_id}/model", run_id=run_id)
        assert denied.value.error_code == "PERMISSION_DENIED"
        with pytest.raises(requests.HTTPError, match="403"):  # MLflow's artifact client
            as_bob.log_text(run_id, "not bob's", "bob.txt")
    deleted = rest(team, "POST", "/api/2.0/mlflow/runs/delete", bob, run_id=run_id)
    assert deleted.status_code == 403
    promoted = one_line(bam(bob_dir, client_env(team, "bob"), "promote"))
    assert all(w in promoted for w in (uri, "'bob'", "EDIT", "registered model 'bam-vae-cnn'"))
    trained = one_line(bam(bob_dir, client_env(team, "bob"), "train"))
    assert all(w in trained for w in (uri, "'bob'", "EDIT", "READ", "experiment 'bam-vae'"))
    assert not (bob_dir / "models").exists(), "bob's train did work before it was refused"
    with as_user(team, "admin") as admin:
        assert admin.get_run(run_id).info.lifecycle_stage == "active"
        assert len(admin.search_runs([experiment])) == 2
        assert len(admin.search_model_versions("name = 'bam-vae-cnn'")) == 2
        assert admin.get_model_version_by_alias("bam-vae-cnn", "champion").version == "1"
        assert "bob.txt" not in [a.path for a in admin.list_artifacts(run_id)]

    # Alice manages hers: promote moves her alias, and she may delete her runs.
    promoted = bam(alice_dir, client_env(team, "alice"), "promote")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    alice = ("alice", PASSWORDS["alice"])
    with as_user(team, "alice") as as_alice:
        assert as_alice.get_model_version_by_alias("bam-vae-cnn", "champion").version == "2"
        spare = as_alice.create_run(experiment).info.run_id
    assert rest(team, "POST", "/api/2.0/mlflow/runs/delete", alice, run_id=spare).ok

    # The admin revokes: bob reads nothing of hers any more.
    with as_user(team, "admin"):
        users.revoke_user_permission("bob", "experiment", experiment)
    assert rest(team, "GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", bob).status_code == 403


def test_clients_that_cannot_get_in_stop_in_one_line_before_any_work(team, tmp_path):
    work = tmp_path / "client"
    work.mkdir()
    # The certificate not trusted (no MLFLOW_TRACKING_SERVER_CERT_PATH).
    env = client_env(team, "admin", PASSWORDS["admin"])
    env.pop("MLFLOW_TRACKING_SERVER_CERT_PATH")
    line = one_line(bam(work, env, "report"))
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in line and team["uri"] in line
    # A host name the server does not allow (--allowed-hosts localhost:PORT): /health answers,
    # the API does not.
    other = f"https://127.0.0.1:{team['port']}"
    line = one_line(bam(work, client_env(team, "admin", MLFLOW_TRACKING_URI=other), "report"))
    assert other in line and "--allowed-hosts" in line
    assert not (work / "reports").exists()


def test_no_secret_on_a_command_line_and_the_secret_key_private(team):
    """`ps` shows every local user each process's argv: no password, no key there."""
    import psutil

    root = psutil.Process(team["proc"].pid)
    tree = [root, *root.children(recursive=True)]
    key_file = team["root"] / "config" / "bam-vae" / "flask-secret-key"
    key = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            argv = " ".join(proc.cmdline())
            assert PASSWORDS["admin"] not in argv and key not in argv and "bam:bam" not in argv
    assert PASSWORDS["admin"] not in team["log"].read_text()


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--host", "0.0.0.0"], {}, ["--host 0.0.0.0", "--auth", "--trusted-network"]),
        (["--host", "0.0.0.0", "--auth", "--auth-db", "postgresql://bam@127.0.0.1/x"], {},
         ["clear text", "--ssl-certfile"]),
        (["--auth"], {}, ["--auth-db", "MLFLOW_AUTH_CONFIG_PATH"]),
        (["--auth", "--auth-db", "AUTH"], {}, ["MLFLOW_AUTH_ADMIN_PASSWORD"]),
        (["--auth", "--auth-db", "AUTH"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
         ["at least 12 characters"]),
    ],
    ids=["exposed-without-auth", "auth-without-tls", "no-auth-db", "no-admin-password",
         "short-password"],
)  # fmt: skip
def test_bam_server_refuses_an_open_or_half_set_up_server_in_one_line(
    database, tmp_path, args, env, words
):
    name = f"{database.rsplit('/', 1)[1]}_{uuid.uuid4().hex[:6]}"
    as_postgres("createdb", "-O", "bam", name)  # an empty auth database: no admin yet
    try:
        args = [a.replace("AUTH", f"postgresql://bam@127.0.0.1:5432/{name}") for a in args]
        full = env_with_venv() | {"PGPASSWORD": "bam", "XDG_CONFIG_HOME": str(tmp_path)}
        full.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
        full |= env
        done = bam(tmp_path, full, "server", "--db", database, "--port", str(free_port()), *args)
        line = one_line(done)
        assert all(w in line for w in words), line
    finally:
        as_postgres("dropdb", "--if-exists", "--force", name)
