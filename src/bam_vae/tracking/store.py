"""MLflow: one store per project (or per team), one run per trained model, a registry version.

The default store is ``mlruns/mlflow.db`` under the real project root (``DVC_ROOT`` inside
``dvc exp run --temp/--queue`` copies), so every experiment, wherever DVC runs it, lands in
the same place. ``MLFLOW_TRACKING_URI`` names another store: a tracking server (it keeps the
artifacts) or a SQLite file, possibly shared by several checkouts on one disk. Artifacts
always live with the store -- ``artifacts/`` beside its SQLite file, or ``BAM_ARTIFACT_ROOT``
-- never inside whichever checkout happened to use the store first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.tracking import MlflowClient

from bam_vae import paths
from bam_vae.errors import BamError
from bam_vae.files import exclusive, write_json
from bam_vae.paths import project_root
from bam_vae.sweep import git
from bam_vae.tracking import auth
from bam_vae.uris import mask

if TYPE_CHECKING:
    from bam_vae.datasets.base import DatasetInfo

EXPERIMENT = "bam-vae"
RUN_REF = paths.RUN_REF

# MLflow logs every alembic migration and registry step at INFO; keep stage output readable.
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


ARTIFACT_ROOT_ENV = "BAM_ARTIFACT_ROOT"


def store_dir() -> Path:
    return project_root() / "mlruns"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


def is_remote(uri: str | None = None) -> bool:
    """A tracking server (``http(s)://``): it stores runs and artifacts, nothing local."""
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def sqlite_file(uri: str | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` store (absolute), else None."""
    uri = uri or tracking_uri()
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_root() -> Path:
    """Where a local store keeps run artifacts: ``$BAM_ARTIFACT_ROOT``, else ``artifacts/``
    beside the SQLite file (``mlruns/artifacts`` for the project's own store).

    Raises :class:`BamError` for a database URI without a file (``postgresql://`` used
    directly, not through a server) when ``$BAM_ARTIFACT_ROOT`` is not set."""
    if os.environ.get(ARTIFACT_ROOT_ENV):
        return Path(os.environ[ARTIFACT_ROOT_ENV]).expanduser().resolve()
    database = sqlite_file()
    if database is None:
        raise BamError(
            f"MLFLOW_TRACKING_URI {mask(tracking_uri())}: a database without a tracking server"
            f" has no place for artifacts; set {ARTIFACT_ROOT_ENV} to a shared folder, or run"
            " `bam server` on it and point MLFLOW_TRACKING_URI at the server"
        )
    return database.parent / "artifacts"


@contextmanager
def store_lock() -> Iterator[None]:
    """Serialise schema creation and registry writes between parallel queue workers.

    SQLite allows one writer; MLflow's first-use migrations and model registration are
    multi-statement and fail with "database is locked" or duplicate rows when two
    ``dvc queue`` workers race. Metric logging is short and goes unlocked.
    """
    database = sqlite_file()
    if database is None:  # a server's (or any other) database serialises its own writers
        yield
        return
    # Beside the database, so every checkout and sweep trial writing to one store shares it.
    with exclusive(database.parent / ".store.lock", f"the MLflow store {database}", wait=True):
        yield


def _create_experiment(name: str) -> str:
    # Opens the UI on "Training runs" rather than MLflow 3's GenAI overview.
    tags = {"mlflow.experimentKind": "custom_model_development"}
    if not is_remote():
        # Explicit: MLflow's default artifact location is relative to the working directory.
        artifact_root().mkdir(parents=True, exist_ok=True)
        return mlflow.create_experiment(name, artifact_root().as_uri(), tags)
    # A server picks the location itself (its proxied artifact store, for every client).
    try:
        return mlflow.create_experiment(name, tags=tags)
    except mlflow.exceptions.MlflowException:  # another client created it just now
        return mlflow.get_experiment_by_name(name).experiment_id


def check_server(uri: str) -> None:
    """A tracking server (``http(s)://``) must answer and let this client in, within seconds:
    MLflow's client retries an unreachable server with backoff for minutes before it fails with
    a long traceback; this asks once, up front, before any work (:func:`auth.check_server`)."""
    if is_remote(uri):
        auth.check_server(uri)


_checked: set[str] = set()


def init(experiment: str = EXPERIMENT, writes: str = "") -> str:
    """Point MLflow at the project store and return the experiment id (created if new).

    ``writes`` (``"train writes its run"``): the caller is about to write into the
    experiment, so a tracking server's user without EDIT on it stops here, before any work
    (:func:`auth.require`)."""
    uri = _connect()
    with store_lock():
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else _create_experiment(experiment)
    if found and found.lifecycle_stage == "deleted":
        raise BamError(
            f"MLflow experiment {experiment!r} ({experiment_id}) is deleted in {mask(uri)};"
            f" `mlflow experiments restore --experiment-id {experiment_id}` brings it back, or"
            " `mlflow gc` empties the trash and the next stage creates a new one"
        )
    if found and not is_remote(uri):
        check_artifact_location(found.artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    if writes:
        auth.require(uri, "experiment", experiment_id, f"experiment {experiment!r}", writes)
    return experiment_id


def can_write(experiment_id: str) -> bool:
    """Whether this client may write into the experiment (always, but on a server whose
    basic-auth app gives its user less than EDIT there)."""
    return auth.can_write(tracking_uri(), "experiment", experiment_id)


def user() -> str | None:
    """Who the tracking server is told is calling (MLflow's credentials), None if nobody."""
    return auth.user(tracking_uri()) if is_remote() else None


def require_model(name: str, writes: str) -> None:
    """Before any work: a tracking server's user may write registered model ``name`` if they
    can see it (a new one is theirs to manage; the basic-auth app answers 403 alike for a model
    that does not exist and for one its user may not read, which then refuses the write)."""
    uri = _connect()
    if not is_remote(uri):
        return
    try:
        client().get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
            return
        raise
    auth.require(uri, "registered_model", name, f"registered model {name!r}", writes)


def _connect() -> str:
    """Point MLflow at the project's store (a server checked once to answer); its URI."""
    uri = tracking_uri()
    if uri not in _checked:
        check_server(uri)
        _checked.add(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_model_ref(ref: dict[str, str], stage: str) -> None:
    """Before a stage writes to the model's run and registered version (``ref``, from
    ``models/mlflow_run.json``): the experiment, the run and the version still exist (in
    MLflow's trash counts as gone), else one line saying what is gone and how to remake it."""
    uri = _connect()
    c = client()
    retrain = "run `bam train` (or `dvc repro -f train`) to train and register the model again"

    def gone(what: str, how: str) -> BamError:
        return BamError(
            f"{stage}: {what} is gone from {mask(uri)} ({how}; {RUN_REF} names it); {retrain}"
        )

    try:
        run = c.get_run(ref["run_id"])
    except mlflow.exceptions.MlflowException:
        # Deleted for good, or another store (a fresh clone with `dvc pull` but no store).
        how = "not in this store: point MLFLOW_TRACKING_URI at the one that has it"
        raise gone(f"MLflow run {ref['run_id']}", how) from None
    experiment = c.get_experiment(run.info.experiment_id)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        restore = f"`mlflow experiments restore --experiment-id {run.info.experiment_id}`"
        raise gone(f"MLflow experiment {run.info.experiment_id}", f"deleted; {restore} undoes it")
    if run.info.lifecycle_stage == "deleted":
        restore = f"`mlflow runs restore --run-id {ref['run_id']}`"
        raise gone(f"MLflow run {ref['run_id']}", f"deleted; {restore} undoes it")
    if "model_name" in ref:
        try:
            c.get_model_version(ref["model_name"], ref["model_version"])
        except mlflow.exceptions.MlflowException:
            what = f"registered version {ref['model_name']}/{ref['model_version']}"
            raise gone(what, "deleted from the model registry") from None


def check_artifact_location(location: str) -> None:
    """Refuse a local store whose experiment keeps its artifacts somewhere else.

    A store written by an older bam-vae, first used from checkout B, keeps every checkout's
    artifacts inside B: deleting B loses them, and B's folders are re-created to log more."""
    expected = artifact_root()
    if location.startswith("file:"):
        from urllib.parse import unquote, urlparse

        found = Path(unquote(urlparse(location).path))
    else:
        found = Path(location) if "://" not in location else None
    if found is not None and found.resolve() == expected:
        return
    raise BamError(
        f"experiment {EXPERIMENT!r} in {mask(tracking_uri())} keeps its artifacts in {location},"
        f" not with the store ({expected}); set {ARTIFACT_ROOT_ENV}={found or location} to keep"
        " writing there, or point MLFLOW_TRACKING_URI at a new store"
    )


def git_commit() -> str:
    """The checkout's commit (a ``dvc exp run --temp`` copy has no .git: DVC's baseline)."""
    found = git.head_commit(Path.cwd(), required=False)
    return found or os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


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
        tags["optuna_trial"] = os.environ.get("BAM_TRIAL", "")
    return tags


def log_dataset(path: Path, sha256: str, context: str, n: int, info: DatasetInfo) -> None:
    """The data a run saw, as an MLflow dataset input ``<dataset>-<split>``: its file,
    SHA-256, size and class names (JSON, in the input's tags)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    name = f"{info.name}-{Path(path).stem}"
    dataset = MetaDataset(source=source, name=name, digest=sha256[:32])  # digest: 36 chars max
    classes = json.dumps(list(info.classes))[:5000]  # within MLflow's tag length
    tags = {"sha256": sha256, "n_images": str(n), "dataset": info.name, "classes": classes,
            "labelled": str(info.labelled)}  # fmt: skip
    # The store looks a dataset up, then inserts it: two runs starting together on a server both
    # insert and one fails on the unique key, its transaction rolled back. Again, it finds the row.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return
        except mlflow.exceptions.MlflowException as e:
            raced = "duplicate key" in str(e) or "UNIQUE constraint" in str(e)
            if not raced or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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


def model_run(stage: str, path: Path = RUN_REF) -> dict[str, str]:
    """The preamble of every stage that works on the trained model's run, in one order and
    before any work: read ``models/mlflow_run.json``, check that its experiment, run and
    registered version still exist and the tracking server answers (one line otherwise,
    :func:`check_model_ref`), that a server's user may write the run and the version, and point
    MLflow at the store. Returns the reference (``run_id``,
    ``model_name``, ``model_version``, ``model_uri``); the stage then loads the model and logs
    through :func:`reopen_run`."""
    ref = read_run_ref(path)
    check_model_ref(ref, stage)
    init(writes=f"{stage} logs")
    if "model_name" in ref:
        require_model(ref["model_name"], f"{stage} tags the version it scores")
    return ref


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
            f"MLflow run {run_id} (from {RUN_REF}) is not in {mask(tracking_uri())}; restore that"
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
            f"model {model_uri!r} not found in {mask(tracking_uri())}: {exc}".splitlines()[0]
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


def resolve_model(model_uri: str | None) -> tuple[Path, str]:
    """(model file, MLflow run id): the pipeline's model, or the one behind any model URI.

    A URI (``models:/bam-vae-cnn/3``, ``models:/bam-vae-cnn@champion``, ``runs:/...``) is
    resolved to the run that logged it, whose ``checkpoint/vae.pt`` holds the same weights as
    the registered generator plus the encoder (needed for reconstructions).
    """
    if not model_uri:
        return paths.MODEL, read_run_ref()["run_id"]
    init()
    run_id = model_run_id(model_uri)
    return download_artifact(run_id, "checkpoint/vae.pt"), run_id
