"""``bam sweep``: an Optuna study whose trials are DVC experiments run as Ray tasks.

Optuna owns the search: the study and its trials live in an Optuna storage (a journal file
in the checkout, or the team's PostgreSQL), its sampler picks each point (TPE, random or
the grid), its pruner stops hopeless trials from their per-epoch values, and a second driver
with the same name and storage joins the study. Ray owns placement: each trial is a Ray task
(:func:`bam_vae.sweep.trial.run_trial`) on any node with the CPUs it asks for, retried if
its node dies. What no library does is here: a trial is ``dvc exp run`` of the committed
code in a clone, its per-epoch values are read back from its MLflow run, every trial is one
MLflow child run of the study's parent run (FAILED with its reason, or KILLED and tagged
``pruned``), and an interrupted trial (Ctrl-C, SIGTERM, a driver killed) is marked FAIL and
retried, never left RUNNING nor counted.

Why not Ray Tune: ``OptunaSearch`` switches Optuna's pruners off and keeps its state in
Tune's experiment folder, which one driver owns (``Tuner.restore``); a study that survives
any driver and that others join needs the Optuna storage to be the one record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam_vae.errors import BamError, Interrupted, reason, require_extra
from bam_vae.sweep import git
from bam_vae.sweep.space import (
    Space,
    as_text,
    check_name,
    check_values,
    default_name,
    parse_space,
)
from bam_vae.sweep.trial import STOP_GRACE_S, Trial, numbers, run_trial
from bam_vae.tracking import registry
from bam_vae.uris import mask

STORAGE_ENV = "BAM_STUDY_STORAGE"
POLL_S = 2.0  # how often a trial's MLflow run is read for its per-epoch values
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "asha")


class _Quiet(logging.Filter):
    """Optuna logs a traceback for every failed trial: ours say why in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(
            record.exc_info[1], TrialFailed | Stopped | Surplus | TakenOver
        ):
            record.exc_info = None
        return True


class TrialFailed(Exception):
    """A trial that ran and failed (bad params, the pipeline failed): FAIL, counted."""


class Surplus(Exception):
    """Another driver of the study started its last trial first: FAIL, not counted."""


class TakenOver(Exception):
    """Another driver's heartbeat check failed the trial while it ran here: not counted, its
    point retried (Optuna #5470, #4234)."""


class Stopped(Exception):
    """The driver was told to stop: the trial is FAIL, not counted, and retried."""


# An RDB study's heartbeat: a driver silent this long has its running trials failed and retried.
GRACE_S = 60
# Draws in a row of points the study holds already before a driver takes the space as exhausted.
MAX_DUPLICATES = 100


def sweeps_dir(root: Path) -> Path:
    """The checkout's studies (the journal) and trial logs (``NAME/NAME-<n>.log``)."""
    return root / ".cache" / "sweeps"


def journal_path(root: Path) -> Path:
    return sweeps_dir(root) / "optuna.journal"


def open_storage(url: str | None, root: Path) -> tuple[Any, str]:
    """The study's storage and how to name it: a journal file in the checkout (one machine,
    several processes: Optuna's FAQ) or an RDB URL (PostgreSQL for a cluster; a heartbeat
    fails a dead driver's trials and retries them)."""
    import optuna

    if not url:
        path = journal_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        try:
            return optuna.storages.JournalStorage(backend), str(path)
        except Exception as exc:  # a record Optuna cannot read, in the middle of the file
            raise BamError(f"cannot read the study journal {path}: {reason(exc)}") from None
    if not url.startswith(("postgresql", "mysql", "sqlite")):
        raise BamError(f"--storage {url!r}: expected postgresql://USER:PW@HOST/DB, sqlite:///FILE"
                       " or nothing (a journal file in the checkout)")  # fmt: skip
    if url.startswith("postgresql"):
        require_extra("psycopg", "a study on PostgreSQL")
    full = "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith(
        "postgresql://") else url  # fmt: skip
    check_not_tracking_store(url, full)
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            storage = optuna.storages.RDBStorage(full, heartbeat_interval=20, grace_period=GRACE_S,
                                                 heartbeat_stale_trial_callback=retry)  # fmt: skip
    except Exception as exc:
        raise BamError(f"cannot open the study storage {mask(url)}: {reason(exc)}") from None
    return storage, mask(url)


def repair_journal(path: Path) -> None:
    """Cut a torn last record off Optuna's journal file, keeping a copy of the whole file.

    Optuna's file backend appends without checking that the file ends in a newline (Optuna
    #5138): after a record cut off by a full disk or a killed machine, the next record is glued
    to it and no process reads the study again. Every complete record ends in a newline, so the
    bytes after the last one are the torn record; cut under Optuna's own lock (no writer is
    mid-record), after copying the file to ``<name>.torn-<unix time>``."""
    import shutil

    import optuna

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        copy = path.with_name(f"{path.name}.torn-{int(time.time())}")
        shutil.copy2(path, copy)
        with path.open("r+b") as out:
            out.truncate(cut)
            os.fsync(out.fileno())
    finally:
        lock.release()
    print(f"sweep: the study journal {path} ended in a torn record at byte {cut} (of"
          f" {len(data)}); cut there, every complete record kept, the whole file copied to"
          f" {copy}", flush=True)  # fmt: skip


# MLflow's own tables (tracking; its basic-auth app's users): a database holding them is a store.
_MLFLOW_TABLES = ({"experiments", "runs", "registered_models"}, {"users", "alembic_version_auth"})


def check_not_tracking_store(url: str, full: str) -> None:
    """Refuse a study storage that is an MLflow database, before Optuna writes to it: Optuna
    and MLflow both keep their schema revision in one ``alembic_version`` table (Optuna
    #2866/#5360, MLflow #3374), so each would find the other's revision and stop."""
    import sqlalchemy

    if full.startswith("sqlite:///") and not Path(full.removeprefix("sqlite:///")).is_file():
        return  # a new file: Optuna creates it
    engine = sqlalchemy.create_engine(full)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except Exception as exc:
        raise BamError(f"cannot open the study storage {mask(url)}: {reason(exc)}") from None
    finally:
        engine.dispose()
    if any(kind <= tables for kind in _MLFLOW_TABLES):
        found = ", ".join(sorted(tables & set().union(*_MLFLOW_TABLES)))
        raise BamError(
            f"--storage {mask(url)} is an MLflow database (its tables {found}); Optuna and"
            " MLflow both keep their schema"
            " version in its alembic_version table and would break each other: expected a"
            " database of its own (`createdb -O bam optuna`, docs/sweeps.md)"
        )


def interrupted(t: Any) -> bool:
    """A FAIL without a reason of ours: its driver stopped or died mid-trial, or it was one
    too many (joined drivers asked for the last trials together)."""
    from optuna.trial import TrialState

    return t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs


def finished(study: Any) -> list[Any]:
    """The trials that count towards ``--trials``: complete, pruned or failed for a reason."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done and not interrupted(t)]


def _alive(pid: int, started: float) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    return False


def recover(study: Any) -> None:
    """Trials left RUNNING by a driver of this machine that is gone (SIGKILL, a crash): FAIL,
    then retried. Drivers of other machines are the heartbeat's (RDB storages)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid, started = t.user_attrs.get("driver") or ["", 0, 0.0]
        if host == socket.gethostname() and not _alive(int(pid), float(started)):
            print(f"sweep: trial {t.number} was left running by driver {pid}, which is gone:"
                  " marked failed and retried", flush=True)  # fmt: skip
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            retry(study, t)


def retry(study: Any, t: Any) -> None:
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


# ------------------------------------------------------------------------------ checks
@dataclass
class Plan:
    """A sweep checked before any Ray, MLflow or study work."""

    space: Space
    name: str
    root: Path
    commit: str
    source: str
    cache_dir: str
    metric: str
    stage: str
    direction: str
    trials: int
    sampler: str
    pruner: str
    prune_on: str
    warmup: int
    startup: int
    seed: int
    address: str | None
    num_cpus: float
    num_gpus: float
    storage: str | None
    trusted_network: bool = False


def _metric_files(root: Path) -> dict[str, str]:
    """``metrics/x.json`` -> the dvc.yaml stage that writes it."""
    from bam_vae.config import load_yaml  # YAML 1.2, as DVC reads dvc.yaml

    stages = load_yaml((root / "dvc.yaml").read_text()).get("stages", {})
    found = {}
    for name, stage in stages.items():
        for entry in (stage.get("do") or stage).get("metrics", []):
            found[next(iter(entry)) if isinstance(entry, dict) else entry] = name
    return found


def metric_stage(root: Path, metric: str) -> str:
    """The stage whose metrics file holds ``metric`` (committed files; a classifier-space
    score is also there in the Inception space)."""
    known: dict[str, str] = {}
    for path, stage in _metric_files(root).items():
        for key in numbers(root / path):
            for name in (key, key.replace("_classifier", "_inception")):
                known.setdefault(name, stage)  # test_loss: train's, not the evaluator's
    if metric not in known:
        raise BamError(f"--metric {metric!r} is not a metric of the pipeline; expected one of"
                       f" {', '.join(sorted(known))}")  # fmt: skip
    return known[metric]


def plan(options: list[str], trials: int | None = None, **kw: Any) -> Plan:
    """Every check that needs no cluster, no tracking store and no study."""
    if trials is not None and trials < 1:  # 0 is not "unset": the grid's size
        raise BamError(f"--trials {trials}: expected at least 1")
    space = parse_space(options)
    name = kw.get("name") or default_name()
    check_name(name)
    sampler = kw.get("sampler") or ("tpe" if trials else "grid")
    if sampler not in SAMPLERS:
        raise BamError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    pruner, direction = kw.get("pruner", "none"), kw.get("direction", "minimize")
    if pruner not in PRUNERS:
        raise BamError(f"--pruner {pruner!r}: expected one of {', '.join(PRUNERS)}")
    if direction not in ("minimize", "maximize"):
        raise BamError(f"--direction {direction!r}: expected minimize or maximize")
    if pruner != "none" and direction != "minimize":
        raise BamError(f"--pruner {pruner} compares per-epoch losses (--prune-on), lower is"
                       " better: expected --direction minimize")  # fmt: skip
    if sampler == "grid":
        if space.grid is None:
            raise BamError(
                "--sampler grid: interval() takes any value in a range; give"
                " --trials N (TPE), or list the values"
            )
        trials = trials or max(space.grid_size, 1)
    elif not trials:
        raise BamError(f"--sampler {sampler} needs --trials N (how many trials to finish)")
    num_cpus, num_gpus = kw.get("num_cpus", 1.0), kw.get("num_gpus", 0.0)
    if num_cpus <= 0 or num_gpus < 0:
        raise BamError(f"--num-cpus must be > 0 and --num-gpus >= 0 (got {num_cpus}, {num_gpus})")
    root = git.repo_root(kw.get("cwd") or Path.cwd())
    git.check_clean(root)
    check_values(space, root / "params.yaml")
    metric = kw.get("metric", "fid_classifier")
    stage = metric_stage(root, metric)
    prune_on = kw.get("prune_on", "test_loss")
    history = root / "metrics" / "train_history.csv"
    columns = history.read_text().splitlines()[0].split(",") if history.is_file() else []
    if pruner != "none" and prune_on not in columns:
        raise BamError(f"--prune-on {prune_on!r} is not a per-epoch value of train; expected"
                       f" one of {', '.join(c for c in columns if c != 'epoch')}")  # fmt: skip
    commit = git.head_commit(root)
    return Plan(
        space=space, name=name, root=root, commit=commit,
        source=git.clone_source(root, commit), cache_dir=git.cache_dir(root), metric=metric,
        stage=stage, direction=direction, trials=trials, sampler=sampler, pruner=pruner,
        prune_on=prune_on, warmup=kw.get("warmup", 1), startup=kw.get("startup", 5),
        seed=kw.get("seed", 0), address=kw.get("address") or os.environ.get("RAY_ADDRESS"),
        num_cpus=num_cpus, num_gpus=num_gpus,
        storage=kw.get("storage") or os.environ.get(STORAGE_ENV),
        trusted_network=kw.get("trusted_network", False),
    )  # fmt: skip


def sampler_seed(seed: int, held: int) -> int:
    """The seed of a driver's sampler: ``--seed`` itself for a new study; for a resume or a
    join, a stream of its own derived from ``--seed`` and the trials the study holds. With
    ``--seed`` alone every resume re-drew the points it had drawn the first time (Optuna
    #4714, #1547: a sampler reseeds per trial only when ``n_jobs > 1``)."""
    import numpy as np

    return seed if held == 0 else int(np.random.SeedSequence([seed, held]).generate_state(1)[0])


def _sampler(p: Plan, held: int = 0) -> Any:
    import optuna

    if p.sampler == "grid":  # --seed for every driver: it orders the grid's ids, which they share
        return optuna.samplers.GridSampler(p.space.grid, seed=p.seed)
    seed = sampler_seed(p.seed, held)
    if p.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(p: Plan) -> Any:
    import optuna

    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup, n_warmup_steps=p.warmup)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup))
    if p.pruner == "asha":  # Optuna's successive halving is the asynchronous one (ASHA)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, p.warmup))
    return optuna.pruners.NopPruner()


def open_study(p: Plan) -> tuple[Any, str]:
    """Create the study, or load it to resume or join: the same space, metric, direction
    and commit, or one line saying which differs."""
    import optuna

    storage, where = open_storage(p.storage, p.root)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage=storage)}
    if p.name not in names and git.experiments_named(p.root, p.name):
        raise BamError(f"experiments {p.name}-<n> exist already but no study {p.name} in"
                       f" {where}; pick another --name")  # fmt: skip
    try:
        study = optuna.create_study(storage=storage, study_name=p.name, sampler=_sampler(p),
                                    pruner=_pruner(p), direction=p.direction,
                                    load_if_exists=True)  # fmt: skip
    except optuna.exceptions.OptunaError as exc:
        raise BamError(f"study {p.name} in {where}: {reason(exc)}") from None
    held = len(study.get_trials(deepcopy=False))
    if held:  # a resume or a join: a sampler stream of its own
        study.sampler = _sampler(p, held)
    mine = {"space": list(p.space.options), "metric": p.metric, "commit": p.commit}
    for key, value in mine.items():
        had = study.user_attrs.get(key)
        if had is None:
            study.set_user_attr(key, value)
        elif had != value:
            raise BamError(f"study {p.name} in {where} has {key} {had}, not {value}; give the"
                           " same to resume or join it, or pick another --name")  # fmt: skip
    if study.direction.name.lower() != p.direction:
        raise BamError(f"study {p.name} in {where} is to {study.direction.name.lower()}"
                       f" {p.metric}, not {p.direction}")  # fmt: skip
    return study, where


# ------------------------------------------------------------------------------ Ray
def _import_ray(local: bool) -> Any:
    if local and "ray" not in sys.modules:
        # A local instance listens on 127.0.0.1 only: Ray's "single-node" mode (its switch is
        # named for Windows/macOS, where that is the default).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        own = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE")
        if not own and not (Path.home() / ".ray" / "auth_token").is_file():
            # Token auth with a token that lives as long as this sweep's instance.
            import secrets

            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    require_extra("ray", "bam sweep")
    import ray

    return ray


def check_token_auth(p: Plan) -> None:
    """A cluster on other machines asks for Ray's token (``RAY_AUTH_MODE=token``): without it,
    anyone who reaches its ports runs code on every node (CVE-2023-48022). Asked the way Ray's
    own CLI asks, without a token: ``ray status`` answering means the cluster is open.

    Raises :class:`BamError` for an open cluster, unless ``--trusted-network``."""
    import shutil

    if p.trusted_network:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    try:
        done = subprocess.run([ray_cli, "status", "--address", p.address], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return  # no answer at all: ray.init says why
    if done.returncode == 0:
        raise BamError(
            f"--address {p.address}: the Ray cluster answers without a token, so anyone who"
            " reaches it can run code on its nodes; start its nodes with RAY_AUTH_MODE=token"
            " (docs/sweeps.md#setting-up-nodes), or pass --trusted-network on a private"
            " network you trust"
        )


@contextlib.contextmanager
def connect(p: Plan, uri: str) -> Any:
    """``ray.init`` (a new local instance when no address), checked and shut down."""
    import logging

    local = p.address in (None, "", "local")
    ray = _import_ray(local)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if local:  # trials pass small dicts: a small object store is plenty
            ray.init(address="local", include_dashboard=False, object_store_memory=200 * 2**20,
                     **kwargs)  # fmt: skip
        else:
            ray.init(address=p.address, **kwargs)
    except Exception as exc:
        where = "start a local Ray instance" if local else f"reach the Ray cluster at {p.address}"
        raise BamError(
            f"cannot {where}: {reason(exc)} (is `ray start --head` running there?"
            " With token auth, set RAY_AUTH_MODE=token and its token)"
        ) from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = [n["Resources"] for n in nodes]
        if not any(r.get("CPU", 0) >= p.num_cpus and r.get("GPU", 0) >= p.num_gpus for r in res):
            raise BamError(
                f"no node of the Ray cluster has the {p.num_cpus:g} CPU and"
                f" {p.num_gpus:g} GPU a trial asks for (--num-cpus, --num-gpus)"
            )
        hosts = {n["NodeManagerAddress"] for n in nodes} - {ray.util.get_node_ip_address()}
        if hosts and not uri.startswith(("http://", "https://", "postgresql", "mysql")):
            raise BamError(f"the Ray cluster has nodes on other machines ({', '.join(hosts)}),"
                           f" which cannot write the store {mask(uri)}; start a tracking server and"
                           " set MLFLOW_TRACKING_URI=http://... (docs/sweeps.md)")  # fmt: skip
        if hosts and p.source == str(p.root):
            raise BamError(
                "the Ray cluster has nodes on other machines, which cannot clone"
                f" {p.root}; add an `origin` git remote they reach, and push"
            )
        slots = sum(int(r.get("CPU", 0) // p.num_cpus) for r in res)
        yield ray, max(1, slots)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------ the study
def trial_runs(client: Any, experiment_id: str, parent: str, number: int,
               status: str | None = None) -> list[Any]:  # fmt: skip
    """The MLflow runs of trial ``number`` under the study's ``parent`` run, newest first."""
    query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.optuna_trial = '{number}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])


class Driver:
    """Runs the study's trials from ``Study.optimize``'s threads (one per Ray slot)."""

    def __init__(self, p: Plan, study: Any, ray: Any, parent: str, uri: str) -> None:
        from bam_vae.tracking import store as tracking

        self.p, self.study, self.ray, self.parent, self.uri = p, study, ray, parent, uri
        self.client, self.experiment_id = tracking.client(), tracking.init()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.duplicates = 0  # draws in a row of points the study holds already
        self.again = False  # this pass of optimize lost trials to such draws
        me = __import__("psutil").Process()
        self.me = [socket.gethostname(), me.pid, me.create_time()]
        self.env = git.git_identity(p.root)
        if os.environ.get(tracking.ARTIFACT_ROOT_ENV):  # every trial writes there too
            self.env[tracking.ARTIFACT_ROOT_ENV] = str(tracking.artifact_root())
        self.task = ray.remote(max_retries=2, retry_exceptions=False)(run_trial).options(
            num_cpus=p.num_cpus, num_gpus=p.num_gpus)  # fmt: skip
        self.logs = sweeps_dir(p.root) / p.name
        self.logs.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f} s] {text}", flush=True)

    def _suggest(self, trial: Any) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        values = {}
        for key, d in self.p.space.distributions.items():
            if isinstance(d, CategoricalDistribution):
                values[key] = trial.suggest_categorical(key, d.choices)
            elif isinstance(d, IntDistribution):
                values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
            else:
                values[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        return values

    def objective(self, trial: Any) -> float:
        from optuna.trial import TrialState

        from bam_vae.config import ConfigError, load_params

        values = self._suggest(trial)
        if self.stop.is_set():  # a trial asked as the driver stops (maybe a retry): retried
            retry(self.study, trial)
            raise Stopped(f"trial {trial.number} not started; retried on the next run")
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if len(finished(self.study)) + len(running) - 1 >= self.p.trials:
            trial.set_user_attr("surplus", "the study had its trials running or finished")
            self.study.stop()
            raise Surplus(f"trial {trial.number} not run: the study has its {self.p.trials}")
        if self._held(trial, values):  # TPE and random sampling may draw a point again
            trial.set_user_attr("duplicate", "the study holds this point already")
            self.duplicates += 1
            self.again = self.duplicates <= MAX_DUPLICATES  # a pass more for the trials left
            if not self.again:
                self.say(f"{MAX_DUPLICATES} points in a row the study already holds: the space"
                         " looks exhausted; stopping")  # fmt: skip
                self.study.stop()
            raise Surplus(f"trial {trial.number} not run: the study holds its point already")
        self.duplicates = 0
        exp = f"{self.p.name}-{trial.number}"
        trial.set_user_attr("driver", self.me)
        trial.set_user_attr("dvc_exp", exp)
        overrides = self.p.space.overrides(values)
        label = " ".join(f"{k}={as_text(v)}" for k, v in values.items())
        self.say(f"trial {trial.number} ({exp}) started: {label}")
        try:
            load_params(self.p.root / "params.yaml", [o for o in overrides if ":" not in o])
        except ConfigError as exc:
            self.fail(trial, str(exc), values)
        spec = Trial(
            number=trial.number, overrides=tuple(overrides), sweep=self.p.name, exp_name=exp,
            stage=self.p.stage, source=self.p.source, commit=self.p.commit,
            tracking_uri=self.uri, parent_run_id=self.parent, num_cpus=self.p.num_cpus,
            driver_ip=self.ray.util.get_node_ip_address(), driver_pid=os.getpid(),
            root=str(self.p.root),
            cache_dir=self.p.cache_dir, env=self.env,
        )  # fmt: skip
        ref = self.task.remote(spec)
        self._watch(trial, ref, values)
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # lost with every retry, or a Ray-level failure
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {reason(exc)}"}
        if self._taken_over(trial):
            self._drop(trial, None)
        if result.get("log"):
            (self.logs / f"{exp}.log").write_text(result["log"])
        trial.set_user_attr("node", f"{result.get('node_id', '')[:8]} ({result.get('host', '')})")
        trial.set_user_attr("seconds", round(result.get("seconds", 0.0), 1))
        trial.set_user_attr("phases", {k: round(v, 1) for k, v in result.get("phases", {}).items()})
        if result["status"] != "done":
            self.fail(trial, result["reason"] or "failed", values)
        value = result["metrics"].get(self.p.metric, math.nan)
        if not math.isfinite(value):
            self.fail(trial, f"{self.p.metric} is {value} (not written, or not finite)", values)
        run_id = self.child_run(trial.number, result, values)
        trial.set_user_attr("mlflow_run_id", run_id)
        return value

    def _watch(self, trial: Any, ref: Any, values: dict[str, Any]) -> None:
        """Wait for the task; meanwhile report its per-epoch values and prune or stop it."""
        import optuna

        step = 0
        while not self.ray.wait([ref], timeout=POLL_S)[0]:
            if self.stop.is_set():
                self._cancel(ref)
                retry(self.study, trial)
                raise Stopped(f"trial {trial.number} interrupted; retried on the next run")
            if self.p.pruner == "none":
                continue
            run = self.runs(trial.number, "RUNNING")
            history = self.client.get_metric_history(run[0], self.p.prune_on) if run else []
            for m in sorted(history, key=lambda m: m.step):
                if m.step > step:
                    step = m.step
                    try:
                        trial.report(m.value, step)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        self._drop(trial, ref)
                    if trial.should_prune():
                        why = f"epoch {step}: {self.p.prune_on} {m.value:.4g}"
                        self._cancel(ref)
                        trial.set_user_attr("pruned", why)
                        for run_id in self.runs(trial.number):
                            self.client.set_tag(run_id, "pruned", why)
                            with contextlib.suppress(Exception):
                                self.client.set_terminated(run_id, status="KILLED")
                        raise optuna.TrialPruned(why)

    def _held(self, trial: Any, values: dict[str, Any]) -> bool:
        """Whether another trial that counts (finished, or running) has these params."""
        from optuna.trial import TrialState

        others = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        counted = [*finished(self.study), *others]
        return any(t.number != trial.number and t.params == values for t in counted)

    def _taken_over(self, trial: Any) -> bool:
        """Whether another driver's heartbeat check failed this trial while it ran here: this
        driver stopped beating for longer than the grace period (a machine asleep, a swap
        stall, a lost connection) and the other one took it for dead (RDB storages)."""
        from optuna.trial import TrialState

        failed = self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return any(t.number == trial.number for t in failed)

    def _drop(self, trial: Any, ref: Any) -> None:
        """Give up a trial another driver failed: stop its task, supersede its runs (KILLED,
        their versions deleted), so its point's retry gives the one FINISHED child run; say
        so and raise :class:`TakenOver` (the driver goes on, :func:`optimize`)."""
        if ref is not None:
            self._cancel(ref)
        for run_id in self.runs(trial.number):  # FINISHED too: its pipeline ran on meanwhile
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, status="KILLED")
            self._supersede(run_id, "its retry")
        self.say(f"trial {trial.number}: failed by another driver's heartbeat check while it"
                 f" ran here (no heartbeat for over {GRACE_S} s); its point runs again as a"
                 " retry, this run is dropped")  # fmt: skip
        raise TakenOver(f"trial {trial.number} was failed by another driver")

    def _cancel(self, ref: Any) -> None:
        """Stop a task's pipeline (its guard: SIGTERM, then SIGKILL) and wait for it."""
        with contextlib.suppress(Exception):
            self.ray.cancel(ref)
            self.ray.wait([ref], timeout=STOP_GRACE_S + 20)

    def runs(self, number: int, status: str | None = None) -> list[str]:
        """Ids of the MLflow runs of trial ``number`` under the parent, newest first."""
        found = trial_runs(self.client, self.experiment_id, self.parent, number, status)
        return [r.info.run_id for r in found]

    def child_run(self, number: int, result: dict[str, Any] | None, values: dict) -> str:
        """The trial's one child run: the one its training logged (older attempts of a
        retried task are KILLED, their versions deleted), or a new one (a point served from
        DVC's run cache, a trial that never ran) with its values and results."""
        found = self.runs(number)
        keep = result.get("run_id", "") if result else ""
        if keep in found:
            for other in found:
                if other != keep:
                    self._supersede(other, keep)
            return keep
        tags = {"mlflow.parentRunId": self.parent, "sweep": self.p.name,
                "optuna_trial": str(number), "dvc_exp_name": f"{self.p.name}-{number}",
                "bam_model_run": keep}  # fmt: skip
        run_id = self.client.create_run(self.experiment_id, run_name=tags["dvc_exp_name"],
                                        tags=tags).info.run_id  # fmt: skip
        model = self._model_run(number, keep, run_id) if keep else None
        if model is not None:  # from the run cache: the model's params and scores
            for k, v in model.params.items():
                self.client.log_param(run_id, k, v)
        else:
            for k, v in values.items():
                self.client.log_param(run_id, k, as_text(v))
        if keep:  # the restored scores (and the model run's, where this store has it)
            scores = {**(model.metrics if model else {}), **(result or {}).get("metrics", {})}
            for k, v in scores.items():
                self.client.log_metric(run_id, k, v)
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _model_run(self, number: int, keep: str, run_id: str) -> Any:
        """The data of the run that trained a model restored from DVC's run cache, or None
        when that run is in another store (checkouts sharing one DVC cache, each with its own
        MLflow store): the child run then records the restored metrics and says where the
        model was logged (tag ``bam_model_run_store``)."""
        import mlflow

        try:
            return self.client.get_run(keep).data
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        self.client.set_tag(run_id, "bam_model_run_store", "another store (DVC's run cache)")
        self.say(f"trial {number}: restored from DVC's run cache; its model's run {keep} is not"
                 f" in {mask(self.uri)} (another checkout sharing the cache logged it): the"
                 " child run records the restored metrics")  # fmt: skip
        return None

    def _supersede(self, run_id: str, keep: str) -> None:

        why = f"superseded by run {keep} (the task was retried)"
        with contextlib.suppress(Exception):
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")
            self.client.set_tag(run_id, "bam_sweep_settled", why)
            registry.delete_versions_of_run(run_id)

    def fail(self, trial: Any, why: str, values: dict[str, Any]) -> None:
        """Record the reason in the study and on the trial's FAILED child run; raise."""
        why = why.strip().splitlines()[-1][:500] if why.strip() else "failed"
        trial.set_user_attr("fail_reason", why)
        found = self.runs(trial.number)
        run_id = found[0] if found else self.child_run(trial.number, None, values)
        self.client.set_tag(run_id, "bam_fail_reason", why)
        self.client.set_terminated(run_id, status="FAILED")
        raise TrialFailed(why)

    def enough(self, study: Any, _trial: Any) -> None:
        """Callback: stop once the study (every driver's trials) has its ``--trials``."""
        if len(finished(study)) >= self.p.trials:
            study.stop()


@contextlib.contextmanager
def storage_errors(where: str) -> Any:
    """An error of the study's storage while the study runs (a journal Optuna cannot read;
    SQLite or PostgreSQL gone or refusing, which Optuna's RDB storage raises as
    ``StorageInternalError``), as one line naming the storage."""
    import json

    import optuna

    try:
        yield
    except (optuna.exceptions.StorageInternalError, json.JSONDecodeError) as exc:
        raise BamError(f"the study storage {where}: {type(exc).__name__}: {reason(exc)}") from None


def optimize(study: Any, driver: Any, slots: int) -> None:
    """``study.optimize`` with ``driver.objective`` until the study has ``--trials`` finished
    trials. A trial another driver's heartbeat check failed while it ran here makes Optuna
    raise "Cannot tell a FAIL trial" out of ``optimize`` once the objective returns (it tells
    without ``skip_if_finished``); the objective has said so in one line (:class:`TakenOver`),
    so this goes on with the trials left. So it does after a pass in which drawn points
    that the study already held took trials (``driver.again``)."""
    while (left := driver.p.trials - len(finished(study))) > 0:
        driver.again = False
        try:
            study.optimize(driver.objective, n_trials=left, n_jobs=min(slots, left),
                           catch=(TrialFailed, Surplus), callbacks=[driver.enough])  # fmt: skip
        except ValueError as exc:
            if "Cannot tell a FAIL trial" not in str(exc):
                raise
            continue
        if not driver.again:
            return


def _table(study: Any) -> str:
    rows = [("#", "state", "value", "time", "params / reason")]
    for t in study.get_trials(deepcopy=False):
        state = "INTERRUPTED" if interrupted(t) else t.state.name
        state = "NOT RUN" if "surplus" in t.user_attrs else state
        state = "DUPLICATE" if "duplicate" in t.user_attrs else state
        value = f"{t.value:.4g}" if t.state.name == "COMPLETE" else "-"
        secs = t.user_attrs.get("seconds") or (t.duration and t.duration.total_seconds())
        why = t.user_attrs.get("fail_reason") or t.user_attrs.get("pruned") or ""
        given = t.params or t.system_attrs.get("fixed_params", {})  # an enqueued retry's
        params = " ".join(f"{k}={as_text(v)}" for k, v in given.items())
        if "retry_of" in t.user_attrs:
            why = f"(retry of {t.user_attrs['retry_of']}) {why}"
        rows.append((str(t.number), state, value, f"{secs:.0f} s" if secs else "-",
                     f"{params} {why}".strip()))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]).rstrip()
                     for r in rows)  # fmt: skip


def _settle(study: Any, client: Any, experiment_id: str, parent: str) -> None:
    """The MLflow runs of interrupted trials: KILLED and tagged, whatever their pipeline did
    after its driver died (a model it finished stays registered, and a retry of the same
    point uses it from DVC's run cache)."""
    for t in study.get_trials(deepcopy=False):
        if not interrupted(t):
            continue
        for run in trial_runs(client, experiment_id, parent, t.number):
            if "bam_sweep_settled" not in run.data.tags:
                client.set_tag(run.info.run_id, "bam_sweep_settled", "its trial was interrupted")
                if run.info.status != "KILLED":
                    client.set_terminated(run.info.run_id, status="KILLED")


def _summarise(study: Any, client: Any, parent: str, p: Plan) -> None:
    """The parent run: best value and params, the trials, Optuna's own figures."""
    import matplotlib.pyplot as plt  # Optuna draws with pyplot
    import optuna.visualization.matplotlib as plots

    client.log_text(parent, _table(study) + "\n", "study/trials.txt")
    client.log_text(parent, study.trials_dataframe().to_csv(index=False), "study/trials.csv")
    complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    client.log_metric(parent, "trials_finished", len(finished(study)))
    if not complete:
        return
    best = study.best_trial
    client.log_metric(parent, f"best_{p.metric}", best.value)
    client.set_tag(parent, "best_trial", str(best.number))
    for k, v in best.params.items():
        client.set_tag(parent, f"best.{k}", as_text(v))
    figures = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "slice": plots.plot_slice,
    }
    for name, draw in figures.items():
        with warnings.catch_warnings(), contextlib.suppress(Exception):  # too few trials
            warnings.simplefilter("ignore")
            axes = draw(study)
            axes = axes.flat[0] if hasattr(axes, "flat") else axes
            client.log_figure(parent, axes.figure, f"study/{name}.png")
            plt.close(axes.figure)


def _parent_run(study: Any, p: Plan, where: str) -> str:
    from bam_vae.tracking import store as tracking

    client, experiment_id = tracking.client(), tracking.init()
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent and tracking.run_exists(parent):
        client.update_run(parent, status="RUNNING")
        return parent
    parent = client.create_run(experiment_id, run_name=p.name, tags={
        "sweep": p.name, "bam_kind": "sweep", "sweep_space": " ".join(p.space.options),
        "optuna_storage": where, "optuna_study": p.name, "metric": p.metric,
        "direction": p.direction, "git_commit": p.commit, "mlflow.source.git.commit": p.commit,
    }).info.run_id  # fmt: skip
    study.set_user_attr("mlflow_parent_run_id", parent)
    return parent


def sweep(options: list[str], trials: int | None = None, **kw: Any) -> Any:
    """The ``bam sweep`` command: check, open (or resume, or join) the study, run trials
    until it has ``trials`` finished ones, summarise. Returns the study."""
    import optuna

    p = plan(options, trials, **kw)
    if p.address not in (None, "", "local"):  # before any study or run is opened
        check_token_auth(p)
    for handler in optuna.logging.get_logger("optuna").handlers:  # Optuna's own handler
        handler.addFilter(_Quiet())
    os.chdir(p.root)  # the tracking store is this checkout's (tracking.tracking_uri)
    from bam_vae.tracking import store as tracking

    uri = tracking.tracking_uri()
    tracking.init(writes="bam sweep logs its study run")  # a server that refuses: here
    study, where = open_study(p)
    with storage_errors(where):  # the storage failing mid-study: one line naming it
        recover(study)
        parent = _parent_run(study, p, where)
        had = len(finished(study))
        left = p.trials - had
        print(
            f"sweep {p.name}: {had} of {p.trials} trials finished, {p.sampler}"
            f" sampler, pruner {p.pruner}, metric {p.metric} ({p.direction}) from stage"
            f" {p.stage}; study in {where}; parent run {parent} in {mask(uri)}",
            flush=True,
        )
        status = "FINISHED"
        driver = None
        if left > 0:
            with connect(p, uri) as (ray, slots):
                driver = Driver(p, study, ray, parent, uri)
                previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

                def stop(signum: int, _frame: Any) -> None:
                    driver.say(f"{signal.Signals(signum).name}: stopping the running trials;"
                               " finished ones are kept")  # fmt: skip
                    driver.stop.set()

                for s in previous:
                    signal.signal(s, stop)
                try:
                    optimize(study, driver, slots)
                except Stopped:
                    status = "KILLED"
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)
        done = finished(study)
        if p.source != str(p.root):  # trials pushed their experiments to origin: fetch them here
            made = {t.user_attrs["dvc_exp"] for t in done if t.state.name == "COMPLETE"}
            missing = sorted(made - set(git.experiments_named(p.root, p.name)))
            why = git.pull_experiments(p.root, missing) if missing else ""
            if why:
                print(f"sweep: the experiments stay on origin ({why}); `dvc exp pull origin"
                      f" {p.name}-<n>` fetches one", flush=True)  # fmt: skip
        if status == "FINISHED" and len(done) < p.trials:
            status = "RUNNING"  # other drivers still at it: the last one closes the parent
        client = tracking.client()
        _settle(study, client, tracking.init(), parent)
        _summarise(study, client, parent, p)
        if status != "RUNNING":
            client.set_terminated(parent, status=status)
        print("\n" + _table(study), flush=True)
        if status == "KILLED":
            raise Interrupted(
                f"sweep {p.name} interrupted: {len(done)} of {p.trials} trials"
                " finished and are kept; the same command continues the study"
            )
        complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise BamError(f"sweep {p.name}: no trial completed ({len(done)} finished); reasons"
                           f" above, logs in {sweeps_dir(p.root) / p.name}")  # fmt: skip
        best = study.best_trial
        print(f"\nsweep {p.name}: {len(done)} of {p.trials} trials finished; best trial"
              f" {best.number} ({p.name}-{best.number}) {p.metric} {best.value:.4g}; `dvc exp"
              f" apply {p.name}-{best.number}`, `bam report --sweep {p.name}`, `optuna-dashboard"
              f" {where}`", flush=True)  # fmt: skip
        return study
