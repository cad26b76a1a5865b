"""``bam server --auth``: MLflow's basic-auth app (``mlflow server --app-name basic-auth``), wired.

The app does the work: users, passwords (12 characters at least), per-experiment and
per-registered-model permissions (READ, USE, EDIT, MANAGE, NO_PERMISSIONS) in an auth database
of its own, 401 for anonymous requests and 403 for a member without the permission. bam only
gives it what MLflow asks for, in MLflow's own settings:

- the ini named by ``MLFLOW_AUTH_CONFIG_PATH``, honoured as it is; without one, bam writes one
  (``database_uri`` from ``--auth-db``, ``default_permission``, ``admin_username``) into a
  private folder for the server's lifetime;
- the admin's password only from ``MLFLOW_AUTH_ADMIN_PASSWORD`` or that ini (MLflow's own
  settings; it is needed once, to create the admin in an empty auth database), never a
  default, never on a command line;
- ``MLFLOW_FLASK_SERVER_SECRET_KEY`` (CSRF), the same for every worker and every restart:
  the user's, else one bam generates once into a 0600 file of the user's configuration.

MLflow's own bootstrap (secret key, auth database, admin user) runs first, so a missing setting
is one line before any worker starts. Source: MLflow's "Basic HTTP authentication" docs and
``mlflow/server/auth/`` (3.18).
"""

from __future__ import annotations

import configparser
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bam_vae.errors import BamError
from bam_vae.uris import has_password, mask

if TYPE_CHECKING:
    from bam_vae.tracking.server import ServerOptions

CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_DB_ENV = "BAM_SERVER_AUTH_DB"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
# MLflow's own start-up check of the basic-auth app, run alone for a one-line error.
BOOTSTRAP = (
    "from mlflow.server.auth import bootstrap_admin_user, get_flask_server_secret_key\n"
    "get_flask_server_secret_key()\n"
    "bootstrap_admin_user()\n"
)


def config_dir() -> Path:
    """The user's bam-vae settings: ``$XDG_CONFIG_HOME/bam-vae`` (``~/.config/bam-vae``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "bam-vae"


def secret_key() -> str:
    """``$MLFLOW_FLASK_SERVER_SECRET_KEY``, else the key in ``<config_dir>/flask-secret-key``,
    generated (32 random bytes, hex) into a new 0600 file the first time."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    path = config_dir() / "flask-secret-key"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # O_EXCL: two servers starting together keep the first key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise BamError(
                f"{path}: readable by other users (mode {path.stat().st_mode & 0o777:o});"
                f" expected 0600: `chmod 600 {path}`"
            ) from None
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path.read_text().strip()


def _auth_db(o: ServerOptions, db: str) -> str:
    from bam_vae.tracking.server import sqlalchemy_uri, warn_argv

    auth_db = o.auth_db or os.environ.get(AUTH_DB_ENV)
    if not auth_db:
        raise BamError(
            "--auth: no database for users and permissions; pass --auth-db"
            " postgresql://USER@HOST/mlflow_auth (a database of its own), set"
            f" {AUTH_DB_ENV}, or name MLflow's ini in {CONFIG_ENV}"
        )
    if o.auth_db and has_password(o.auth_db):
        warn_argv("--auth-db", o.auth_db)
    auth_db = sqlalchemy_uri(auth_db, "--auth-db")
    if auth_db == db:
        raise BamError(
            f"--auth-db {mask(auth_db)} is the tracking database; expected a database of its own"
            " (`createdb -O bam mlflow_auth`)"
        )
    return auth_db


def _written_ini(o: ServerOptions, db: str, folder: Path) -> Path:
    if o.default_permission not in PERMISSIONS:
        raise BamError(
            f"--default-permission {o.default_permission!r}: expected one of"
            f" {', '.join(PERMISSIONS)}"
        )
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": o.default_permission,
        "database_uri": _auth_db(o, db),
        "admin_username": "admin",  # MLFLOW_AUTH_ADMIN_USERNAME overrides it (MLflow's own)
    }
    path = folder / "basic_auth.ini"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        config.write(out)
    return path


def _users_ini(o: ServerOptions) -> Path:
    path = Path(os.environ[CONFIG_ENV]).expanduser()
    if o.auth_db:
        raise BamError(
            f"--auth-db and {CONFIG_ENV}={path}: the ini decides; set database_uri there, or"
            " unset the variable"
        )
    config = configparser.ConfigParser(interpolation=None)
    try:
        found = config.read(path)
    except configparser.Error as exc:
        raise BamError(f"{CONFIG_ENV}={path}: {str(exc).splitlines()[0]}") from None
    if not found or "mlflow" not in config:
        raise BamError(f"{CONFIG_ENV}={path}: no [mlflow] section; expected MLflow's ini")
    missing = [k for k in ("default_permission", "database_uri") if k not in config["mlflow"]]
    if missing:
        raise BamError(f"{CONFIG_ENV}={path}: no {', '.join(missing)} in [mlflow]")
    return path


@contextmanager
def configured(o: ServerOptions, db: str) -> Iterator[dict[str, str]]:
    """The environment of ``mlflow server --app-name basic-auth`` for ``o``, checked by
    MLflow's own bootstrap (which also creates the auth tables and the admin user); a
    generated ini lives in a private folder until the server stops.

    Raises :class:`BamError`: no auth database, a bad ``--default-permission``, an unreadable
    ini, no admin password for an empty auth database, one under 12 characters."""
    from bam_vae.errors import require_extra

    require_extra("flask_wtf", "bam server --auth (MLflow's basic-auth app)")
    if os.environ.get(CONFIG_ENV) and o.default_permission != "NO_PERMISSIONS":
        raise BamError(f"--default-permission and {CONFIG_ENV}: the ini decides; set it there")
    with tempfile.TemporaryDirectory(prefix="bam-server-auth-") as folder:  # 0700
        ini = _users_ini(o) if os.environ.get(CONFIG_ENV) else _written_ini(o, db, Path(folder))
        env = {CONFIG_ENV: str(ini), SECRET_ENV: secret_key()}
        done = subprocess.run([sys.executable, "-c", BOOTSTRAP], capture_output=True, text=True,
                              env=os.environ | env)  # fmt: skip
        if done.returncode:
            raise BamError(f"--auth: {_mlflow_error(done.stderr)}")
        yield env


def _mlflow_error(stderr: str) -> str:
    """The message of the exception MLflow's bootstrap raised last (the outermost), on one
    line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("mlflow.exceptions.", "sqlalchemy.exc.", "psycopg.")):
            return mask(line.split(": ", 1)[-1])
    return mask(lines[-1]) if lines else "MLflow's basic-auth app failed to start"


def describe(env: dict[str, str]) -> str:
    """What the auth app runs with, for the start-up line (no secret)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(env[CONFIG_ENV])
    section = config["mlflow"]
    return (
        f"\n  auth: MLflow's basic-auth app, users in {mask(section['database_uri'])}, default"
        f" permission {section['default_permission']} ({CONFIG_ENV}={env[CONFIG_ENV]})"
    )
