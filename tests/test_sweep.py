"""`bam sweep`: the search space and every refusal (fast), and real studies on a local Ray
instance and a real two-node Ray cluster on this machine (slow): a TPE study whose driver is
SIGKILLed and resumed, pruned and failed trials, a point served from DVC's run cache, a node
killed mid-study, optuna-dashboard and `bam report --sweep` on the result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from helpers import REPO, as_postgres, copy_checkout, env_with_venv, free_port

from bam_vae.errors import BamError
from bam_vae.sweep import guard
from bam_vae.sweep import study as study_module
from bam_vae.sweep.git import dirty_files
from bam_vae.sweep.space import parse_space
from bam_vae.sweep.study import journal_path, plan
from bam_vae.sweep.trial import run_guarded
from bam_vae.tracking.server import sqlalchemy_uri

# Tiny trials on tiny data: the first 512/256 MNIST images (conftest's `tiny_mnist`) tracked
# with `dvc add` in place of the prepare-mnist stage (which insists on the full MNIST), one
# epoch, 64 samples scored. A trial runs the stages up to the one that writes its metric.
TINY = {
    "model": {"z_dim": 3, "channels": [8, 16]},
    "train": {"epochs": 1, "train_fraction": 0.5, "batch_size": 64, "threads": 1},
    "evaluator": {"epochs": 1},
    "generate": {"n": 64, "sampler": "prior"},
    "fid": {"kid_subsets": 5, "kid_subset_size": 50},
}
DROPPED_STAGES = ("prepare-mnist", "tsne", "robustness", "inspect")
DEADLINE = 900  # seconds for one sweep: catches hangs only (these machines can be very slow)


# ------------------------------------------------------------------------------ fast
def test_the_space_reads_hydras_grammar_as_dvc_and_hydra_optuna_sweeper_do():
    space = parse_space([
        "train.lr=tag(log, interval(1e-4, 3e-3))", "model.z_dim=choice(8,16,32)",
        "generate.gmm.components=range(10,200)", "train.recon=gaussian",
        "fid.features=[classifier,inception]", "train.k2=tag(int, interval(1, 4))",
    ])  # fmt: skip
    assert space.fixed == {"train.recon": "gaussian", "fid.features": "[classifier,inception]"}
    d = space.distributions
    assert d["train.lr"] == optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)
    assert d["model.z_dim"] == optuna.distributions.CategoricalDistribution([8, 16, 32])
    # range() as Python's (and DVC's grid): the stop is not a value.
    assert d["generate.gmm.components"] == optuna.distributions.IntDistribution(10, 199)
    assert d["train.k2"] == optuna.distributions.IntDistribution(1, 4)
    assert space.grid is None  # an interval: no grid
    grid = parse_space(["model.z_dim=2,16", "train.lr=range(1,4)", "a.b=choice([a,b],[a])"])
    assert grid.grid == {"model.z_dim": [2, 16], "train.lr": [1, 2, 3],
                         "a.b": ["[a,b]", "[a]"]}  # fmt: skip
    assert grid.grid_size == 12
    assert grid.overrides({"model.z_dim": 2, "train.lr": 0.5}) == ["model.z_dim=2", "train.lr=0.5"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ([], "no search space"),
        (["a"], "expected KEY=VALUE(S)"),
        (["=1,2"], "is not a param key"),
        (["a b=1"], "is not a param key"),
        (["a="], "empty value"),
        (["a=[1,2"], "no viable alternative"),
        (["a=1", "a=2"], "given twice"),
        (["model.z_dim=4,16,4"], "value 4 is given twice; list each once"),
        (["sweep.name=x"], "sets sweep.name itself"),
        (["x=interval(3, 1)"], "interval(3, 1): expected LOW < HIGH"),
        (["x=tag(log, interval(0, 1))"], "a log scale needs LOW > 0"),
        (["x=range(5, 1)"], "is empty"),
        (["x=glob(*)"], "not supported"),
    ],
)
def test_a_bad_space_is_one_line(options, says):
    with pytest.raises(BamError) as err:
        parse_space(options)
    assert says in str(err.value) and "\n" not in str(err.value)


def _git_repo(root: Path) -> Path:
    """A committed checkout with this repository's pipeline and committed metrics."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "metrics", root / "metrics")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env_with_venv(), check=True, capture_output=True)
    return root


@pytest.mark.slow
def test_uncommitted_changes_are_refused_naming_them(tmp_path):
    root = _git_repo(tmp_path / "repo")
    (root / "notes.txt").write_text("untracked files do not count\n")
    assert dirty_files(root) == []
    with (root / "params.yaml").open("a") as file:
        file.write("\n# edited\n")
    with pytest.raises(BamError) as err:
        plan(["model.z_dim=2,4"], cwd=root)
    assert "uncommitted changes in params.yaml" in str(err.value)

    # Through the CLI: one line on stderr, exit status 2, nothing started.
    done = subprocess.run(["bam", "sweep", "-S", "model.z_dim=2,4"], cwd=root,
                          env=env_with_venv(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: uncommitted changes in params.yaml; trials run the committed code (HEAD), so"
        " commit or stash them first"
    ]


@pytest.mark.parametrize(
    ("options", "kw", "says"),
    [
        (["model.z_dim=2,abc"], {}, "-S 'model.z_dim=2,abc': model.z_dim=abc: model.z_dim"),
        (["train.lrr=interval(0.1, 1)"], {"trials": 3}, "unknown key 'train.lrr'"),
        # Each value alone must be valid with some other swept value: 0.5 never is.
        (["train.noise_fraction=0.5,0.7"], {}, "train.noise_std: 0 adds no noise"),
        (["model.z_dim=2"], {"name": "a b"}, "--name 'a b'"),
        (["model.z_dim=2"], {"num_cpus": 0}, "--num-cpus must be > 0"),
        (["model.z_dim=2"], {"metric": "fid_imaginary"}, "--metric 'fid_imaginary' is not a"),
        (["train.lr=interval(0.1, 1)"], {}, "--sampler grid: interval() takes any value"),
        (["train.lr=interval(0.1, 1)"], {"sampler": "random"}, "needs --trials N"),
        (["model.z_dim=2"], {"sampler": "cmaes"}, "--sampler 'cmaes': expected one of"),
        (["model.z_dim=2"], {"pruner": "median", "direction": "maximize"}, "expected --direction"),
        (["model.z_dim=2"], {"pruner": "median", "prune_on": "fid"}, "--prune-on 'fid' is not"),
        (["model.z_dim=2"], {"storage": "redis://x"}, "--storage 'redis://x': expected"),
        (["model.z_dim=2,4"], {"trials": 0}, "--trials 0: expected at least 1"),
    ],
)
def test_bad_values_and_options_fail_before_any_trial(tmp_path, options, kw, says):
    root = _git_repo(tmp_path / "repo")
    with pytest.raises(BamError) as err:
        checked = plan(options, kw.pop("trials", None), cwd=root, **kw)
        from bam_vae.sweep.study import open_storage

        open_storage(checked.storage, root)
    assert says in str(err.value) and "\n" not in str(err.value), err.value


def test_an_unknown_metric_lists_the_numbers_the_pipeline_writes(tmp_path):
    root = _git_repo(tmp_path / "repo")
    with pytest.raises(BamError) as err:
        plan(["model.z_dim=2"], cwd=root, metric="nonsense")
    listed = set(str(err.value).split("expected one of ", 1)[1].split(", "))
    assert {"fid_classifier", "fid_inception", "test_loss", "precision_classifier"} <= listed
    assert not {"dataset", "sampler", "protocol", "warnings", "source"} & listed, listed


@pytest.mark.slow
def test_a_checked_plan_says_what_the_trials_run(tmp_path):
    root = _git_repo(tmp_path / "repo")
    checked = plan(["model.z_dim=2,4", "train.lr=0.01", "train.noise_fraction=0.0,0.5",
                    "train.noise_std=0.0,0.1"], name="s", cwd=root)  # fmt: skip
    assert (checked.sampler, checked.trials, checked.stage) == ("grid", 8, "compute-fid")
    assert checked.source == str(root)
    assert plan(["model.z_dim=2"], metric="test_loss", cwd=root).stage == "train"
    assert plan(["model.z_dim=2"], metric="fid_inception", cwd=root).stage == "compute-fid"
    assert plan(["train.lr=interval(0.1, 1)"], 5, cwd=root).sampler == "tpe"


@pytest.mark.slow
def test_a_resumed_or_joined_study_draws_points_of_its_own(tmp_path, monkeypatch):
    """The study of issue 49: 2 trials of z in range(2,40), then the same command with
    --trials 4. Seeded with --seed alone, the resume drew z = 22 and 29 again (Optuna #4714);
    each resume's sampler now has a stream of its own, reproducibly derived."""
    root = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(root)

    def run_to(trials: int) -> list[int]:
        p = plan(["model.z_dim=range(2,40)"], trials, name="dup", cwd=root, metric="test_loss")
        study, _ = study_module.open_study(p)
        left = trials - len(study.trials)
        study.optimize(lambda t: t.suggest_int("model.z_dim", 2, 39) / 10, n_trials=left)
        return [t.params["model.z_dim"] for t in study.trials]

    first = run_to(2)
    resumed = run_to(4)
    assert resumed[:2] == first and len(set(resumed)) == 4, resumed
    assert study_module.sampler_seed(0, 0) == 0  # a new study: --seed itself, as before
    assert study_module.sampler_seed(0, 2) == study_module.sampler_seed(0, 2)
    assert len({study_module.sampler_seed(0, n) for n in range(50)}) == 50


@pytest.mark.slow
def test_an_mlflow_database_is_refused_as_a_study_storage_before_optuna_writes(tmp_path):
    """MLflow and Optuna both keep their schema revision in `alembic_version` (Optuna #2866,
    MLflow #3374): a study in MLflow's database broke both."""
    import mlflow

    root = _git_repo(tmp_path / "repo")
    database = root / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    mlflow_store = f"sqlite:///{database}"
    mlflow.MlflowClient(mlflow_store).search_experiments()  # MLflow creates its tables
    before = database.read_bytes()
    p = plan(["model.z_dim=2,3"], name="s", cwd=root, storage=mlflow_store)
    with pytest.raises(BamError) as err:
        study_module.open_study(p)
    assert "MLflow database" in str(err.value) and "database of its own" in str(err.value)
    assert database.read_bytes() == before
    with sqlite3.connect(database) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert "studies" not in tables and "trials" not in tables


@pytest.mark.slow
def test_a_trial_failed_by_another_drivers_heartbeat_is_dropped_and_the_study_goes_on(tmp_path):
    """Optuna #5470/#4234: a driver paused past the heartbeat's grace period has its running
    trial failed by another driver (and the point re-enqueued); when its objective returns,
    Optuna raised "Cannot tell a FAIL trial" out of `optimize` and the driver died. Replayed
    on an RDB storage: the first trial is failed underneath its objective, as
    `fail_stale_trials` does, and the driver ends with its 3 trials anyway."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    s = optuna.create_study(storage=storage, study_name="paused")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 0:  # another driver's check, while this one was asleep
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            raise study_module.TakenOver("trial 0 was failed by another driver")
        return x

    driver = SimpleNamespace(p=SimpleNamespace(trials=3), objective=objective, again=False,
                             enough=lambda study, _t: None)  # fmt: skip
    study_module.optimize(s, driver, 1)
    assert [t.state.name for t in s.trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert len(study_module.finished(s)) == 3


def test_the_study_storage_failing_mid_study_is_one_line_naming_it():
    import json

    where = "postgresql://bam@db/x"
    for exc in (optuna.exceptions.StorageInternalError("An exception is raised during the commit"),
                json.JSONDecodeError("Expecting value", '{"op_code": 5, "wor', 18)):  # fmt: skip
        with pytest.raises(BamError) as err, study_module.storage_errors(where):
            raise exc
        assert str(err.value).startswith(f"the study storage {where}: {type(exc).__name__}")


def test_the_guard_runs_its_command_whatever_pythonpath_it_gets(tmp_path):
    """The command's output goes to the log and its exit status comes back. The guard is the
    sweep's own code: a ``bam_vae`` first on the command's PYTHONPATH (the clone's ``src``,
    maybe of a commit without this guard) does not replace it."""
    clone_src = tmp_path / "src" / "bam_vae"
    clone_src.mkdir(parents=True)
    (clone_src / "__init__.py").write_text("raise ImportError('the clone, not the guard')\n")
    env = env_with_venv() | {"PYTHONPATH": str(clone_src.parent)}
    log, work = tmp_path / "trial.log", tmp_path / "work"
    work.mkdir()
    cmd = ["sh", "-c", 'echo out; echo err >&2; echo "$PYTHONPATH"; exit 3']
    assert run_guarded(cmd, tmp_path, env, log, work) == 3
    assert log.read_text() == f"\n$ {' '.join(cmd)}\nout\nerr\n{clone_src.parent}\n"
    assert work.is_dir()  # removed only if the guard's parent dies

    usage = subprocess.run([sys.executable, "-m", "bam_vae.sweep.guard", str(work)],
                           capture_output=True, text=True)  # fmt: skip
    assert usage.returncode == 2 and usage.stderr.startswith("usage: ")


# The guarded command: a process and a child of its own (the pipeline and what it starts).
# On SIGTERM it writes a marker and exits, or ("ignore") it and its child ignore SIGTERM.
GUARDED = """
import signal, subprocess, sys, time
from pathlib import Path
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    # Shutting down takes a while (bam train closes its MLflow run): the guard must wait.
    stop = lambda *_: (time.sleep(1), Path(sys.argv[1]).write_text("TERM"), sys.exit(0))
    signal.signal(signal.SIGTERM, stop)
subprocess.Popen(["sleep", "300"])
time.sleep(300)
"""
# The Ray worker: starts the guard as run_guarded does, says its pid, waits.
WORKER = """
import subprocess, sys
guard = subprocess.Popen([sys.executable, "-P", *sys.argv[1:]], start_new_session=True)
print(guard.pid, flush=True)
guard.wait()
"""


@pytest.mark.parametrize(
    ("on_term", "grace", "victim"),
    [("exit", 60.0, "worker"), ("ignore", 1.0, "worker"), ("exit", 60.0, "outer guard")],
)
@pytest.mark.slow
def test_the_guard_stops_its_group_and_removes_the_work_folder_when_its_parent_dies(
    tmp_path, on_term, grace, victim
):
    """SIGKILL the guard's Ray worker, or the outer guard (Ray kills a worker's children when
    the worker exits): the inner guard SIGTERMs the process group, waits for it (not the whole
    grace once the group has exited), removes the work folder, and SIGKILLs what is left once
    the grace is over."""
    work, marker = tmp_path / "work", tmp_path / "terminated"
    (work / "repo").mkdir(parents=True)
    cmd = [sys.executable, "-c", GUARDED, str(marker), on_term]
    worker = subprocess.Popen([sys.executable, "-c", WORKER, guard.__file__, str(work),
                               str(grace), *cmd], stdout=subprocess.PIPE, text=True)  # fmt: skip
    group = int(worker.stdout.readline())  # the outer guard leads it
    try:
        deadline = time.monotonic() + 60
        while len(guard.members(group)) < 4:  # two guards, the command, its child
            assert time.monotonic() < deadline, "the guarded command did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # the guard keeps running while its parent lives
        assert len(guard.members(group)) == 4 and work.is_dir()

        if victim == "worker":
            worker.kill()
        else:
            os.kill(group, signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 30  # < the grace of "exit": it did not wait that long
        while guard.members(group) or work.exists():
            assert time.monotonic() < deadline, f"left: {guard.members(group)}, {work.exists()}"
            time.sleep(0.1)
        assert marker.exists() == (on_term == "exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        worker.kill()
        worker.wait()


# ------------------------------------------------------------------------------ slow
def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env or env_with_venv(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def make_project(dst: Path, data: Path) -> Path:
    """This repository's tracked files with tiny params and tiny data, committed and pushed to
    a bare origin, a folder as DVC remote, and the default pipeline up to compute-fid run
    once, pushed and locked."""
    root = copy_checkout(dst / "project", TINY, DROPPED_STAGES)
    shutil.copytree(data, root / "data" / "prepared")
    run(["git", "init", "-q", "--bare", "-b", "main", str(dst / "origin.git")], dst)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "remote", "add", "origin", str(dst / "origin.git")], root)
    run(["dvc", "remote", "add", "-d", "store", str(dst / "dvc-store")], root)
    run(["dvc", "add", "data/prepared"], root)
    # The evaluator, the FID reference and the default point, trained once: its metrics are
    # what --metric may name, and trials of the same point come from DVC's run cache.
    run(["dvc", "repro", "compute-fid"], root)
    run(["dvc", "push"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny project"], root)
    run(["git", "push", "-q", "-u", "origin", "main"], root)
    return root


@pytest.fixture(scope="module")
def sweep_project(tmp_path_factory, tiny_mnist) -> Path:
    return make_project(tmp_path_factory.mktemp("sweep"), tiny_mnist)


class Cluster:
    """A real Ray cluster of separate `ray start` nodes on this machine.

    Every process it starts carries a marker in its environment, so teardown stops exactly
    those (not `ray stop`, which would stop any Ray on the machine). Token auth with a fresh
    token: Ray's multi-node mode listens on the machine's address, not only 127.0.0.1."""

    def __init__(self, token_auth: bool = True) -> None:
        self.marker = secrets.token_hex(8)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env = env_with_venv() | {
            "BAM_TEST_RAY_CLUSTER": self.marker,
            **(auth if token_auth else {"RAY_AUTH_MODE": "disabled"}),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.dirs: list[Path] = []
        self.head = self.second = self.third = ""  # node ids

    def start_node(self, head: bool = False) -> str:
        """Start a node with 1 CPU; returns its Ray node id."""
        temp = Path(tempfile.mkdtemp(prefix="bamray-", dir="/tmp"))  # short: socket paths
        self.dirs.append(temp)
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
                  "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]  # fmt: skip
        if head:
            cmd = ["ray", "start", "--head", "--port", str(self.port), "--include-dashboard=false",
                   "--dashboard-port", str(free_port()), *common]  # fmt: skip
        else:
            cmd = ["ray", "start", "--address", self.address, *common]
        run(cmd, Path(temp), self.env | {"BAM_TEST_RAY_NODE": temp.name})
        return self.node_id(temp)

    def raylet(self, temp: Path) -> int:
        for pid in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if args and args[0].endswith(b"/raylet") and str(temp).encode() in b" ".join(args):
                    return int(pid)
        raise AssertionError(f"no raylet of {temp} running")

    def node_id(self, temp: Path) -> str:
        args = Path(f"/proc/{self.raylet(temp)}/cmdline").read_bytes().decode().split("\0")
        return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's raylet and the Ray processes it started (its workers, agents).

        On a machine whose init reaps orphans, a worker notices within a second that its
        raylet is gone and exits; here the killed raylet stays a zombie nobody reaps, which
        Ray's liveness check takes for alive, so its workers are killed with it. The trials'
        own processes (they carry BAM_PARENT_RUN_ID) are left to their guard."""
        raylet, *started = processes([self.raylet(self.dirs[index])])
        raylet.kill()
        for proc in started:
            with contextlib.suppress(psutil.Error):
                if "BAM_PARENT_RUN_ID" not in proc.environ():
                    proc.kill()

    def ours(self) -> list[int]:
        """The processes that carry this cluster's marker. Ray's agents and workers rename
        themselves (``ray::IDLE``), which overwrites their environment: they are found as
        descendants of the marked ones (see ``stop``)."""
        found = []
        needle = f"BAM_TEST_RAY_CLUSTER={self.marker}".encode()
        for pid in os.listdir("/proc"):
            with contextlib.suppress(OSError, ValueError):
                if int(pid) != os.getpid() and needle in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
        return found

    def stop(self) -> None:
        for _ in range(3):  # the whole trees first, so no agent outlives its raylet
            for proc in processes(self.ours()):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            time.sleep(0.5)
        for temp in self.dirs:
            shutil.rmtree(temp, ignore_errors=True)


def processes(pids: list[int]) -> list[psutil.Process]:
    """These processes and all their descendants (psutil checks pid reuse when killing)."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found.setdefault(proc.pid, proc)
    return list(found.values())


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster()
    try:
        nodes.head = nodes.start_node(head=True)
        nodes.second = nodes.start_node()
        yield nodes
    finally:
        nodes.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_cluster_without_token_auth_is_refused_before_any_study(sweep_project):
    """A `ray start --head` without token auth runs anyone's code: `bam sweep --address` to
    it is one line, before a study, a run or a trial exists; --trusted-network lets it be."""
    nodes = Cluster(token_auth=False)
    try:
        nodes.start_node(head=True)
        env = local_env() | {"RAY_USAGE_STATS_ENABLED": "0"}
        args = ["bam", "sweep", "--name", "open", "--trials", "1", "--address", nodes.address,
                "-S", "model.z_dim=2,3"]  # fmt: skip
        done = subprocess.run(args, cwd=sweep_project, env=env, capture_output=True, text=True,
                              timeout=DEADLINE)  # fmt: skip
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
        assert all(w in lines[0] for w in (nodes.address, "RAY_AUTH_MODE=token",
                                           "--trusted-network")), lines[0]  # fmt: skip
        journal = sweep_project / ".cache" / "sweeps" / "optuna.journal"
        assert not journal.is_file() or '"open"' not in journal.read_text()
    finally:
        nodes.stop()


def sweep(root: Path, args: list[str], env: dict[str, str], on_line=None) -> tuple[int, str]:
    """Run `bam sweep` in a process group of its own (as a terminal would), output to a file
    read as it grows (``on_line(line, process)`` sees each new line); on a hang, kill it and
    show what it printed."""
    log = root / f".sweep-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bam", "sweep", *args], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    seen, deadline = 0, time.monotonic() + DEADLINE
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        lines = log.read_text().splitlines()
        if on_line:
            for line in lines[seen:]:
                on_line(line, proc)
        seen = len(lines)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"bam sweep still running after {DEADLINE} s:\n{log.read_text()}")
    output = log.read_text()
    print(output)  # shown by pytest when an assertion fails
    return proc.returncode, output


def rows(root: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return db.execute(sql, args).fetchall()


def children(root: Path, parent: str) -> list[tuple[str, str, str]]:
    """(run id, status, DVC experiment name) of the runs under ``parent``."""
    return rows(
        root,
        "select r.run_uuid, r.status, coalesce(e.value, '') from runs r"
        " join tags p on p.run_uuid = r.run_uuid and p.key = 'mlflow.parentRunId'"
        " left join tags e on e.run_uuid = r.run_uuid and e.key = 'dvc_exp_name'"
        " where p.value = ?",
        parent,
    )


def versions(root: Path, run_ids: list[str]) -> list[tuple]:
    live = rows(root, "select run_id, version from model_versions"
                      " where current_stage != 'Deleted_Internal'")  # fmt: skip
    return [v for v in live if v[0] in run_ids]


def parent_of(output: str) -> str:
    return re.search(r"parent run ([0-9a-f]{32})", output).group(1)


def study(root: Path, name: str, url: str | None = None) -> optuna.Study:
    """The study as Optuna reads it: the checkout's journal, or the database at ``url``."""
    from bam_vae.sweep.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url, root)[0])


def states(s: optuna.Study) -> list[str]:
    """Each trial's state as `bam sweep`'s table says it."""
    return [
        "NOT RUN" if "surplus" in t.user_attrs
        else "INTERRUPTED" if t.state.name == "FAIL" and "fail_reason" not in t.user_attrs
        else t.state.name
        for t in s.get_trials()
    ]  # fmt: skip


def tags(root: Path, run_id: str) -> dict[str, str]:
    return dict(rows(root, "select key, value from tags where run_uuid = ?", run_id))


def local_env() -> dict[str, str]:
    env = env_with_venv()
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_tpe_study_killed_mid_trial_resumes_to_exactly_its_trials(sweep_project, request):
    """SIGKILL of the driver while trials train; the same command again ends the study with
    exactly 4 finished trials: the interrupted ones are FAIL (not counted) and retried, none
    is left RUNNING, and every finished trial is one FINISHED child run under one parent.
    optuna-dashboard reads the study; `bam report --sweep` shows its table and figures."""
    project, token = sweep_project, secrets.token_hex(16)
    own_run = json.loads((project / "models" / "mlflow_run.json").read_text())
    # A token of the test's own: the Ray processes a killed driver leaves are found by it.
    env = local_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    request.addfinalizer(lambda: kill_carrying(f"RAY_AUTH_TOKEN={token}"))
    args = ["--name", "tpe", "--trials", "4", "-S", "model.z_dim=choice(2,3,4)",
            "-S", "train.lr=tag(log, interval(1e-3, 1e-2))"]  # fmt: skip
    driver: dict[str, subprocess.Popen] = {}

    def kill_when_a_later_trial_trains() -> None:
        """Once trials 0 and 1 (the first two slots) are done, as soon as trial 2 or 3 has
        an MLflow run open: SIGKILL the driver only, as the OOM killer would."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            busy = rows(project, "select count(*) from runs r join tags t on t.run_uuid ="
                        " r.run_uuid and t.key = 'optuna_trial' where t.value in ('2', '3')"
                        " and r.status = 'RUNNING'")[0][0]  # fmt: skip
            if busy and "proc" in driver:
                driver["proc"].kill()
                return
            time.sleep(0.2)

    def remember(_line: str, proc: subprocess.Popen) -> None:
        driver["proc"] = proc

    threading.Thread(target=kill_when_a_later_trial_trains, daemon=True).start()
    code, out = sweep(project, args, env, remember)
    assert code == -signal.SIGKILL, out
    assert "RUNNING" in states(study(project, "tpe")), states(study(project, "tpe"))

    code, out = sweep(project, args, env)
    assert code == 0, out
    assert re.search(r"trial \d+ was left running by driver \d+, which is gone", out), out
    s = study(project, "tpe")
    found = states(s)
    assert found.count("COMPLETE") + found.count("PRUNED") == 4, found
    assert "RUNNING" not in found and "INTERRUPTED" in found, found
    retried = [t.user_attrs["retry_of"] for t in s.trials if "retry_of" in t.user_attrs]
    assert retried and all(found[n] == "INTERRUPTED" for n in retried), (found, retried)

    parent = s.user_attrs["mlflow_parent_run_id"]
    assert rows(project, "select status from runs where run_uuid = ?", parent) == [("FINISHED",)]
    runs = children(project, parent)
    done = [t for t in s.trials if t.state.name == "COMPLETE"]
    finished = {e for _, st, e in runs if st == "FINISHED"}
    assert finished == {f"tpe-{t.number}" for t in done}, runs
    assert {st for _, st, _ in runs} <= {"FINISHED", "KILLED"}, runs
    for run_id, _status, exp in runs:  # the interrupted trials' runs, whatever they got to
        if exp not in finished:
            assert tags(project, run_id)["bam_sweep_settled"] == "its trial was interrupted"
    for t in done:  # the value is what the trial's experiment measured
        assert t.value == pytest.approx(tags_metric(project, t.user_attrs["mlflow_run_id"]))
    listed = run(["dvc", "exp", "list", "origin", "--names-only"], project).split()
    assert {f"tpe-{t.number}" for t in done} <= set(listed), listed
    # ... and fetched from origin into the checkout, where the printed `dvc exp apply` runs.
    local = run(["dvc", "exp", "list", "--names-only"], project).split()
    assert {f"tpe-{t.number}" for t in done} <= set(local), local
    best = f"tpe-{s.best_trial.number}"
    assert f"`dvc exp apply {best}`" in out, out
    run(["dvc", "exp", "apply", best], project)
    applied = yaml.safe_load((project / "params.yaml").read_text())
    assert applied["train"]["lr"] == pytest.approx(s.best_trial.params["train.lr"])
    # Back to the project's own commit for the tests that share it: the applied trial's
    # outputs (models/, the run record) are DVC's, so git alone would leave them.
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)
    assert json.loads((project / "models" / "mlflow_run.json").read_text()) == own_run
    # The parent carries Optuna's figures and the trial table.
    arts = artifact_files(project, parent)
    assert {"study/optimization_history.png", "study/trials.csv"} <= arts, arts

    # optuna-dashboard on the study's storage, as README says.
    port = free_port()
    dash = subprocess.Popen(["optuna-dashboard", str(journal_path(project)), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, names = time.monotonic() + 120, []
        while time.monotonic() < deadline and "tpe" not in names:
            with contextlib.suppress(OSError):
                reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5)
                names = [x["study_name"] for x in json.load(reply)["study_summaries"]]
            time.sleep(0.5)
        assert "tpe" in names
    finally:
        dash.kill()
        dash.wait()

    out_dir = project.parent / "report-tpe"
    run(["bam", "report", "--sweep", "tpe", "--out", str(out_dir)], project, env)
    assert (out_dir / "study" / "optimization_history.png").stat().st_size > 0
    assert "tpe-" in (out_dir / "runs.md").read_text()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_torn_journal_record_is_cut_and_the_study_goes_on(sweep_project):
    """A record cut off (a full disk, a killed machine) at the journal's end: Optuna glued the
    next record onto it and no later run could read the study (Optuna #5138). The same
    command cuts the torn bytes (one line naming the file and the byte, a copy kept) and the
    study is whole: the TPE test's 4 finished trials, no traceback, then or after."""
    journal = journal_path(sweep_project)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "torn-by-a-full-dis')
    env = local_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    args = ["--name", "tpe", "--trials", "4", "-S", "model.z_dim=choice(2,3,4)",
            "-S", "train.lr=tag(log, interval(1e-3, 1e-2))"]  # fmt: skip
    code, out = sweep(sweep_project, args, env)
    assert code == 0 and "Traceback" not in out and "4 of 4 trials finished" in out, out
    repaired = [line for line in out.splitlines() if "torn record" in line]
    assert len(repaired) == 1, out
    assert f"{journal} ended in a torn record at byte {len(whole)}" in repaired[0]
    after = journal.read_bytes()  # every record kept, the torn bytes gone, then this run's
    assert after.startswith(whole) and b"torn-by" not in after
    (copy,) = journal.parent.glob("optuna.journal.torn-*")
    assert copy.read_bytes().startswith(whole) and len(copy.read_bytes()) > len(whole)
    code, out = sweep(sweep_project, args, env)  # and after: the study reads as it is
    assert code == 0 and "Traceback" not in out and "torn record" not in out, out
    assert "4 of 4 trials finished" in out


@pytest.mark.e2e
@pytest.mark.slow
def test_a_resumed_sweep_draws_new_points_through_bam_sweep(sweep_project):
    """Issue 49's replay: `bam sweep --trials 2`, then the same command with `--trials 4`:
    the resume drew the first two points again; now the study ends with 4 distinct ones."""
    env = local_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # z from 10 up: the node-kill test's points (5-8) must still train, not come from the cache
    args = ["--name", "dup", "--metric", "test_loss", "-S", "model.z_dim=range(10,40)"]
    for trials in ("2", "4"):
        code, out = sweep(sweep_project, [*args, "--trials", trials], env)
        assert code == 0 and "Traceback" not in out, out
    points = [t.params["model.z_dim"] for t in study(sweep_project, "dup").trials]
    assert len(points) == 4 and len(set(points)) == 4, points


@pytest.mark.e2e
@pytest.mark.slow
def test_bam_sweep_refuses_a_tracking_database_as_its_storage(sweep_project, database):
    """The project's own MLflow SQLite file, and a PostgreSQL database holding MLflow's
    tables (as `bam server` makes one): one line each, nothing written by Optuna."""
    name = f"{database.rsplit('/', 1)[1]}_tracking"
    made = as_postgres("createdb", "-O", "bam", name)
    assert made.returncode == 0, made.stderr
    tracking_db = database.rsplit("/", 1)[0] + "/" + name
    env = local_env()
    try:
        run([sys.executable, "-m", "mlflow", "db", "upgrade", sqlalchemy_uri(tracking_db)],
            sweep_project, env)  # fmt: skip
        before = (sweep_project / "mlruns" / "mlflow.db").stat().st_size
        for storage in ("sqlite:///mlruns/mlflow.db", tracking_db):
            args = [
                "bam",
                "sweep",
                "--name",
                "clash",
                "--storage",
                storage,
                "-S",
                "model.z_dim=2,3",
            ]
            done = subprocess.run(args, cwd=sweep_project, env=env, capture_output=True,
                                  text=True, timeout=DEADLINE)  # fmt: skip
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
            assert "is an MLflow database" in lines[0] and ":bam@" not in lines[0], lines[0]
        found = rows(sweep_project, "select name from sqlite_master where type='table'")
        assert "studies" not in {r[0] for r in found}
        assert (sweep_project / "mlruns" / "mlflow.db").stat().st_size == before
        tables = as_postgres("psql", "-d", name, "-tAc", "select count(*) from information_schema"
                             ".tables where table_name = 'studies'")  # fmt: skip
        assert tables.stdout.strip() == "0", tables
    finally:
        as_postgres("dropdb", "--if-exists", "--force", name)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_point_drawn_again_is_not_run_and_the_study_ends_with_distinct_points(sweep_project):
    """Random sampling of choice(2,3,4) for 3 trials draws some z twice (seed 0, one trial at
    a time: 3, 4, 4; two at a time Optuna reseeds per thread): such a draw is a DUPLICATE row,
    not a trial, and the study ends with the 3 distinct points."""
    env = local_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    args = ["--name", "distinct", "--metric", "test_loss", "--sampler", "random", "--trials",
            "3", "--num-cpus", "2", "-S", "model.z_dim=choice(2,3,4)"]  # fmt: skip
    code, out = sweep(sweep_project, args, env)
    assert code == 0 and "Traceback" not in out, out
    s = study(sweep_project, "distinct")
    done = [t for t in s.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["model.z_dim"] for t in done) == [2, 3, 4], states(s)
    duplicates = [t for t in s.trials if "duplicate" in t.user_attrs]
    assert duplicates and "DUPLICATE" in out, "seed 0 no longer draws a point twice"
    ran = {e for _, _, e in children(sweep_project, s.user_attrs["mlflow_parent_run_id"])}
    assert ran == {f"distinct-{t.number}" for t in done}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_driver_paused_past_the_heartbeat_grace_period_goes_on(sweep_project, database):
    """Optuna #5470/#4234, replayed on PostgreSQL: driver A is stopped (SIGSTOP, as a machine
    asleep) once its first trial starts; driver B joins and, 60 s later, fails A's trial and
    re-enqueues its point. A, continued, used to die in "Cannot tell a FAIL trial"; now it says
    so in one line and goes on. Each point ends with one COMPLETE trial, one FINISHED child run
    and at most one registered version."""
    project = sweep_project
    env = local_env() | {"BAM_STUDY_STORAGE": database, "RAY_AUTH_MODE": "token",
                         "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # fmt: skip
    # z from 40 up: the node-kill test's points (5-8) must still train, not come from the cache
    args = ["--name", "paused", "--num-cpus", "2", "--metric", "test_loss",
            "-S", "model.z_dim=40,41,42,43,44,45"]  # fmt: skip
    a: dict[str, object] = {}

    def stop_a_once_running(line: str, proc: subprocess.Popen) -> None:
        if "started:" in line and "stopped" not in a:
            proc.send_signal(signal.SIGSTOP)
            a["stopped"] = time.monotonic()
            a["trial"] = int(re.search(r"trial (\d+)", line)[1])
            threading.Thread(target=wake_a_when_failed, args=(proc,), daemon=True).start()
            b = threading.Thread(target=lambda: a.update(b=sweep(project, args, env)))
            a["b_thread"] = b
            b.start()

    def wake_a_when_failed(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                trial = study(project, "paused", database).trials[a["trial"]]
                if trial.state.name == "FAIL":
                    break
            time.sleep(2)
        proc.send_signal(signal.SIGCONT)

    code, out = sweep(project, args, env, stop_a_once_running)
    a["b_thread"].join(DEADLINE)
    code_b, out_b = a["b"]
    assert code == 0 and "Traceback" not in out, out
    assert code_b == 0 and "Traceback" not in out_b, out_b
    assert f"trial {a['trial']}: failed by another driver's heartbeat check" in out, out
    s = study(project, "paused", database)
    complete = [t.params["model.z_dim"] for t in s.trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == [40, 41, 42, 43, 44, 45], states(s)
    runs = children(project, s.user_attrs["mlflow_parent_run_id"])
    finished_runs = [(r, e) for r, st, e in runs if st == "FINISHED"]
    number = {f"paused-{t.number}": t.params["model.z_dim"] for t in s.trials}
    assert sorted(number[e] for _, e in finished_runs) == [40, 41, 42, 43, 44, 45], runs
    live = versions(project, [r for r, _, _ in runs])
    assert len(live) <= 6 and len({r for r, _ in live}) == len(live), live


def kill_carrying(needle: str) -> None:
    """SIGKILL every process whose environment holds ``needle``."""
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            if needle.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), signal.SIGKILL)


def tags_metric(root: Path, run_id: str) -> float:
    return rows(root, "select value from latest_metrics where run_uuid = ? and"
                      " key = 'prior/fid_classifier'", run_id)[0][0]  # fmt: skip


def artifact_files(root: Path, run_id: str) -> set[str]:
    uri = rows(root, "select artifact_uri from runs where run_uuid = ?", run_id)[0][0]
    base = Path(uri.removeprefix("file://"))
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_drivers_share_a_study_on_postgresql_with_failed_and_cached_trials(
    sweep_project, database
):
    """A grid of 4 in a study on PostgreSQL, run by two `bam sweep` (the second joins once
    the first runs a trial), one trial at a time each: no point runs twice and the study ends
    with its 4 trials under one parent run. Two points fail validation (noise without a std,
    a std without noise): FAIL trials with their reason, and FAILED child runs with it, with
    no pipeline; the default point is served from DVC's run cache (the model the project
    trained: no new training, no new version); the other trains."""
    project, env = sweep_project, local_env() | {"BAM_STUDY_STORAGE": database}
    before = rows(project, "select count(*) from model_versions")[0][0]
    default_run = json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"]
    args = ["--name", "fails", "--num-cpus", "2", "-S", "train.noise_fraction=0.0,0.5",
            "-S", "train.noise_std=0.0,0.1"]  # fmt: skip
    second: dict[str, object] = {}

    def join_once_running(line: str, _proc: subprocess.Popen) -> None:
        if "started:" in line and not second:
            thread = threading.Thread(
                target=lambda: second.update(done=sweep(project, args, env)), daemon=True
            )
            second["thread"] = thread
            thread.start()

    code, out = sweep(project, args, env, join_once_running)
    second["thread"].join(DEADLINE)
    assert code == 0, out
    code2, out2 = second["done"]
    assert code2 == 0 and "Using an existing study" in out2, out2
    s = study(project, "fails", database)
    ran = [t for t in s.trials if "surplus" not in t.user_attrs]
    assert sorted(states(s)) == sorted(["COMPLETE", "COMPLETE", "FAIL", "FAIL"] + [
        "NOT RUN"] * (len(s.trials) - len(ran)))  # fmt: skip
    by_point = {(t.params["train.noise_fraction"], t.params["train.noise_std"]): t for t in ran}
    assert len(by_point) == 4 == len(ran)  # each point once
    for point in ((0.5, 0.0), (0.0, 0.1)):
        t = by_point[point]
        assert t.state.name == "FAIL" and "adds no noise" in t.user_attrs["fail_reason"]
    parent = s.user_attrs["mlflow_parent_run_id"]
    runs = {e: (r, st) for r, st, e in children(project, parent)}
    assert sorted(st for _, st in runs.values()) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    failed = runs[f"fails-{by_point[(0.5, 0.0)].number}"][0]
    assert "adds no noise" in tags(project, failed)["bam_fail_reason"]
    cached = runs[f"fails-{by_point[(0.0, 0.0)].number}"][0]
    assert tags(project, cached)["bam_model_run"] == default_run
    assert rows(project, "select count(*) from model_versions")[0][0] == before + 1


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_hopeless_trial_is_pruned_after_an_epoch(sweep_project):
    """One trial at a time (2 CPUs each), 40 epochs: a learning rate of 1e-9 has a worse test
    loss after its first epoch than the median of the finished trials, and is PRUNED: its
    run KILLED with a `pruned` tag, no version registered, no DVC experiment."""
    project, env = sweep_project, local_env()
    before = rows(project, "select count(*) from model_versions")[0][0]
    code, out = sweep(project, ["--name", "prune", "-S", "train.lr=0.002,0.001,1e-9",
                                "-S", "train.epochs=40", "--num-cpus", "2", "--pruner",
                                "median", "--startup", "1", "--warmup", "0",
                                "--seed", str(PRUNE_SEED)], env)  # fmt: skip
    assert code == 0, out
    s = study(project, "prune")
    assert [t.params["train.lr"] for t in s.trials][-1] == 1e-9, "the seed orders the grid"
    assert states(s) == ["COMPLETE", "COMPLETE", "PRUNED"], states(s)
    pruned = s.trials[-1]
    assert max(pruned.intermediate_values) < 40
    parent = s.user_attrs["mlflow_parent_run_id"]
    runs = {e: (r, st) for r, st, e in children(project, parent)}
    run_id, status = runs[f"prune-{pruned.number}"]
    assert status == "KILLED" and tags(project, run_id)["pruned"].startswith("epoch ")
    assert rows(project, "select count(*) from model_versions")[0][0] == before + 2
    assert f"prune-{pruned.number}" not in run(["dvc", "exp", "list", "--names-only"], project)


PRUNE_SEED = 3  # GridSampler(seed=3) runs 1e-9 last (Optuna 5)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trial_from_the_run_cache_whose_run_is_in_another_store_still_finishes(
    sweep_project, tmp_path
):
    """Two checkouts sharing one DVC cache, each with its own MLflow store: the default point
    comes back from DVC's run cache with a models/mlflow_run.json naming the other store's
    run. The study used to stop on `Run with id=... not found`; the trial now finishes, its
    child run holding the restored metrics and saying the model's run is elsewhere."""
    project = sweep_project
    other = tmp_path / "other-store" / "mlflow.db"
    other.parent.mkdir()
    env = local_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{other}"}
    code, out = sweep(project, ["--name", "elsewhere", "-S", "model.z_dim=3"], env)
    assert code == 0 and "Traceback" not in out, out
    # The run the cache names: the default point's latest training in the project's store.
    said = re.search(rf"its model's run ([0-9a-f]{{32}}) is not in sqlite:///{other}", out)
    assert said, out
    default_run = said[1]
    assert rows(project, "select count(*) from runs where run_uuid = ?", default_run) == [(1,)]
    s = study(project, "elsewhere")
    assert states(s) == ["COMPLETE"]
    with sqlite3.connect(other) as db:
        child = db.execute(
            "select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid"
            " and t.key = 'optuna_trial' where r.status = 'FINISHED'"
        ).fetchall()
        assert len(child) == 1, child
        found = dict(db.execute("select key, value from tags where run_uuid = ?", child[0]))
        scored = {k for (k,) in db.execute("select key from metrics where run_uuid = ?", child[0])}
    assert found["bam_model_run"] == default_run and "bam_model_run_store" in found
    assert "fid_classifier" in scored


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_study_over_two_nodes_survives_a_node_killed(sweep_project, cluster):
    """A grid over a real two-node cluster; the second node's raylet is killed while one of
    its trials trains: Ray retries that trial elsewhere, and every trial still ends with
    exactly one FINISHED run and one registered version; the experiments are in origin."""
    project = sweep_project
    killed: dict[str, str] = {}

    def kill_when_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = [p for p in processes([cluster.raylet(cluster.dirs[1])])
                    if "bam train" in " ".join(_cmdline(p))]  # fmt: skip
            if busy:
                cluster.kill_node(1)
                killed["at"] = str(time.monotonic())
                cluster.third = cluster.start_node()  # a replacement, so the rest is not serial
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    code, out = sweep(project, ["-S", "model.z_dim=5,6,7,8", "--name", "dead",
                                "--address", cluster.address], cluster.env)  # fmt: skip
    watcher.join(5)
    assert killed, out
    assert code == 0, out
    s = study(project, "dead")
    assert states(s) == ["COMPLETE"] * 4, states(s)
    runs = children(project, s.user_attrs["mlflow_parent_run_id"])
    finished = [(r, e) for r, st, e in runs if st == "FINISHED"]
    assert sorted(e for _, e in finished) == [f"dead-{i}" for i in range(4)], runs
    assert {st for _, st, _ in runs} <= {"FINISHED", "KILLED", "FAILED"}, runs
    live = versions(project, [r for r, _, _ in runs])
    assert sorted(r for r, _ in live) == sorted(r for r, _ in finished)
    listed = run(["dvc", "exp", "list", "origin", "--names-only"], project).split()
    assert {f"dead-{i}" for i in range(4)} <= set(listed)
    fresh = project.parent / "fresh"
    run(["git", "clone", "-q", str(project.parent / "origin.git"), str(fresh)], project.parent)
    run(["dvc", "exp", "pull", "origin", "dead-2"], fresh)
    run(["dvc", "exp", "apply", "dead-2"], fresh)
    z = yaml.safe_load((fresh / "params.yaml").read_text())["model"]["z_dim"]
    assert z == s.trials[2].params["model.z_dim"]


def _cmdline(proc: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return proc.cmdline()
    return []


@pytest.mark.parametrize(
    ("module", "call", "what"),
    [("ray", lambda: study_module._import_ray(False), "bam sweep"),
     ("psycopg", lambda: sqlalchemy_uri("postgresql://u:p@127.0.0.1/db"), "a PostgreSQL store")],
)  # fmt: skip
def test_the_team_extra_missing_is_one_line_saying_how_to_install_it(monkeypatch, module, call,
                                                                     what):  # fmt: skip
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    with pytest.raises(BamError) as err:
        call()
    assert str(err.value) == (
        f"{what} needs {module}, which is not installed; expected `pip install -e '.[team]'`"
        " (Ray and PostgreSQL's driver)"
    )
