"""``bam sweep``: a grid of DVC experiments run as Ray tasks, one MLflow parent run above them.

Each grid point is one Ray task (``run_trial``). It clones the repository at the sweep's
commit into a fresh folder on its node, pulls what a DVC remote has, runs
``dvc exp run -S ... --name <sweep>-<i>`` there with the sweep's tracking store and parent run
in its environment, pushes the results (DVC remote, git ``origin``) and removes the clone.
Trials on the sweep's own machine share its DVC cache (and so its run cache) instead.

The task imports nothing heavy (no torch, no MLflow): the pipeline runs as subprocesses of
this interpreter's ``bin`` folder, the clone's ``src`` first on ``PYTHONPATH`` so the code that
runs is the code of the sweep's commit. Every subprocess runs under a small guard process in a
process group of its own: if the Ray worker dies (its node's raylet is killed), the guard
stops the pipeline (SIGTERM: ``bam train`` marks its run KILLED) and removes the clone, so a
dead attempt never runs on beside its retry. Whatever a dead attempt left in MLflow is settled
at the end (``_settle``): one FINISHED run and one registered version per grid point. Ray is
imported lazily, so ``bam sweep --help`` and the grid checks cost nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bam_vae.errors import BamError, Interrupted, reason

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
KEY_RE = re.compile(r"^(?:[\w./-]+:)?[A-Za-z_][\w-]*(?:\.[\w-]+)*$")
HYDRA_FUNCTIONS = ("range(", "choice(", "interval(", "glob(", "shuffle(", "sort(", "tag(")
LOG_TAIL = 20_000  # characters of a trial's log that come back to the driver
STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL for a trial's process group
# Params whose change retrains the model: points that share them run one after another.
TRAIN_KEYS = ("model.", "train.", "data.")


# ------------------------------------------------------------------------------ the grid
def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``['a', 'b', '[c,d]']``: commas inside brackets or quotes do not split
    (the grammar of ``dvc exp run -S``)."""
    values, stack, quote, start = [], [], "", 0
    closing = {"]": "[", "}": "{", ")": "("}
    for pos, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            stack.append(char)
        elif char in closing:
            if not stack or stack.pop() != closing[char]:
                raise BamError(f"unbalanced {char!r} at position {pos + 1}")
        elif char == "," and not stack:
            values.append(text[start:pos].strip())
            start = pos + 1
    if quote:
        raise BamError(f"unclosed quote {quote}")
    if stack:
        raise BamError(f"unclosed {stack[-1]!r}")
    values.append(text[start:].strip())
    return values


def parse_grid(options: list[str]) -> list[tuple[tuple[str, str], ...]]:
    """``-S`` options -> grid points, the cartesian product across options, in their order.

    Each point is a tuple of ``(key, value)``. Any problem is one line naming the option."""
    if not options:
        raise BamError("no grid: give at least one -S KEY=V1,V2 (e.g. -S model.z_dim=2,16)")
    axes: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for option in options:
        if "=" not in option:
            raise BamError(f"-S {option!r}: expected KEY=V1,V2,..., e.g. -S model.z_dim=2,16")
        key, text = (part.strip() for part in option.split("=", 1))
        if not KEY_RE.match(key):
            raise BamError(f"-S {option!r}: {key!r} is not a param key; expected e.g. train.lr")
        if key in seen:
            raise BamError(f"-S {option!r}: {key} is given twice; put all its values in one -S")
        if key.split(":")[-1] == "train.sweep":
            raise BamError(f"-S {option!r}: bam sweep sets train.sweep itself (use --name)")
        seen.add(key)
        try:
            values = split_values(text)
        except BamError as exc:
            raise BamError(f"-S {option!r}: {exc}") from None
        if not all(values):
            raise BamError(f"-S {option!r}: empty value; expected KEY=V1,V2,... with no empty V")
        for value in values:
            if value.startswith(HYDRA_FUNCTIONS):
                raise BamError(
                    f"-S {option!r}: {value.split('(')[0]}() sweeps are not supported;"
                    " list the values, e.g. -S train.lr=0.001,0.01"
                )
        axes.append([(key, value) for value in values])
    return list(itertools.product(*axes))


def label(point: tuple[tuple[str, str], ...]) -> str:
    return " ".join(f"{key}={value}" for key, value in point)


def default_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------ git
def _git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BamError(f"git {' '.join(args)} in {root}: {why}")
    return done.stdout.strip() if done.returncode == 0 else ""


def repo_root(start: Path) -> Path:
    top = _git(start, "rev-parse", "--show-toplevel", check=False)
    if not top:
        raise BamError(f"{start} is not inside a git repository; bam sweep runs committed code")
    root = Path(top).resolve()
    if not (root / "dvc.yaml").is_file():
        raise BamError(f"{root} has no dvc.yaml; run bam sweep in the bam-vae repository")
    return root


def dirty_files(root: Path) -> list[str]:
    """Tracked files with uncommitted changes (staged or not); untracked files do not count."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise BamError(f"git status in {root}: {done.stderr.strip() or done.returncode}")
    # "XY path" or "XY old -> new" (a rename): name the path as it is now.
    return [line[3:].split(" -> ")[-1] for line in done.stdout.splitlines() if line.strip()]


def check_clean(root: Path) -> None:
    dirty = dirty_files(root)
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise BamError(
            f"uncommitted changes in {shown}; trials run the committed code (HEAD), so commit"
            " or stash them first"
        )


def clone_source(root: Path, commit: str) -> str:
    """Where trials clone from: ``origin`` when the repo has one (the commit must be there),
    else this repository's own path (trials on this machine only)."""
    origin = _git(root, "remote", "get-url", "origin", check=False)
    if not origin:
        return str(root)
    if not _git(root, "branch", "-r", "--contains", commit, check=False):
        raise BamError(
            f"commit {commit[:10]} is not on origin ({origin}); trials clone from there, so"
            " push it first (git push)"
        )
    return origin


def existing_experiments(root: Path, names: list[str]) -> list[str]:
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps/", check=False)
    have = {ref.rsplit("/", 1)[-1] for ref in refs.splitlines()}
    return [name for name in names if name in have]


def git_identity(root: Path) -> dict[str, str]:
    """The sweep's author for the experiments' commits (``dvc exp run`` commits), so nodes
    without a git identity can commit too."""
    name = os.environ.get("GIT_AUTHOR_NAME") or _git(root, "config", "user.name", check=False)
    email = os.environ.get("GIT_AUTHOR_EMAIL") or _git(root, "config", "user.email", check=False)
    name, email = name or "bam sweep", email or "bam-sweep@localhost"
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


# ------------------------------------------------------------------------------ the trial
@dataclass(frozen=True)
class Trial:
    """Everything a Ray task needs to run one grid point, on any node."""

    index: int
    point: tuple[tuple[str, str], ...]
    sweep: str
    exp_name: str
    source: str  # git URL or path to clone
    commit: str
    tracking_uri: str
    parent_run_id: str
    num_cpus: float
    driver_ip: str  # nodes at this IP share the sweep's filesystem
    root: str  # the sweep's checkout, on the driver's machine
    cache_dir: str  # its DVC cache, shared by the trials on that machine
    env: dict[str, str] = field(default_factory=dict)  # git identity


# A process group of its own, led by this guard: if the Ray worker that started it dies
# (getppid changes), stop the whole group -- SIGTERM, then SIGKILL -- and remove the work
# folder, so a dead trial never lives on beside its retry.
_GUARD = r"""
import os, shutil, signal, subprocess, sys, time
work, grace, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
parent, me = os.getppid(), os.getpid()
child = subprocess.Popen(cmd)
def members():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == me:
            found.append(pid)
    return found
while True:
    try:
        sys.exit(child.wait(timeout=0.5))
    except subprocess.TimeoutExpired:
        pass
    if os.getppid() != parent:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while members() and time.monotonic() < deadline:
            child.poll()
            time.sleep(0.2)
        shutil.rmtree(work, ignore_errors=True)
        os.killpg(0, signal.SIGKILL)
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM a guarded command's whole group (``bam train`` marks its run KILLED), then
    SIGKILL whatever is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        if not _group_alive(proc.pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_guarded(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, work: Path) -> int:
    """Run ``cmd`` under the guard, output appended to ``log``; returns its exit status.

    A KeyboardInterrupt here (``ray.cancel`` of a running trial) stops the whole group."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        guard = [sys.executable, "-c", _GUARD, str(work), str(STOP_GRACE_S), *cmd]
        proc = subprocess.Popen(guard, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            while True:  # short waits: Ray delivers a cancel between two Python bytecodes
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=0.5)
        except BaseException:
            stop_group(proc)
            raise


def _tail(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - limit))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trial_env(trial: Trial, clone: Path) -> dict[str, str]:
    # Not the Ray worker's own settings (nor its cluster token), nor a DVC run's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "RAY_"))}
    env.pop("MLFLOW_RUN_ID", None)
    env.update(trial.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The commit's code, not whatever this node has installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone / "src"), env.get("PYTHONPATH")]))
    env["MLFLOW_TRACKING_URI"] = trial.tracking_uri
    env["BAM_PARENT_RUN_ID"] = trial.parent_run_id
    env["BAM_PARALLEL_JOBS"] = str(max(1, int(_cores() // max(trial.num_cpus, 1e-9))))
    return env


def run_trial(trial: Trial, board: Any = None) -> dict[str, Any]:
    """One grid point, on whichever node Ray chose (the body of the Ray task)."""
    import ray  # already imported in a Ray worker

    started = time.time()
    node_id = ray.get_runtime_context().get_node_id()
    host = socket.gethostname()
    node_ip = ray.util.get_node_ip_address()
    same_host = node_ip == trial.driver_ip and Path(trial.root, ".dvc").is_dir()
    if board is not None:
        board.started.remote(trial.index, node_id, host)
    result: dict[str, Any] = {
        "index": trial.index, "point": label(trial.point), "exp_name": trial.exp_name,
        "status": "failed", "node_id": node_id, "host": host, "started": started,
        "run_id": "", "fid": None, "reason": "", "phases": {}, "log": "",
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f"bam-{trial.exp_name}-"))
    log, clone = work / "trial.log", work / "repo"
    env = trial_env(trial, clone)
    phases: dict[str, float] = result["phases"]

    def step(phase: str, cmd: list[str], cwd: Path, must: bool = True) -> bool:
        t0 = time.monotonic()
        rc = run_guarded(cmd, cwd, env, log, work)
        phases[phase] = phases.get(phase, 0.0) + time.monotonic() - t0
        if rc and must:
            result["reason"] = f"{phase}: `{' '.join(cmd[:4])}` exited with status {rc}"
        return rc == 0

    try:
        fetch = ["git", "clone", "--quiet", "--no-checkout", trial.source, str(clone)]
        if not (
            step("clone", fetch, work)
            and step("clone", ["git", "checkout", "--quiet", trial.commit], clone)
        ):
            return result
        if same_host:  # trials on this machine share the checkout's cache and run cache
            step("clone", ["dvc", "cache", "dir", "--local", trial.cache_dir], clone)
        remote = step("remote", ["dvc", "remote", "default"], clone, must=False)
        if remote:  # what it cannot pull it recomputes
            step("pull", ["dvc", "pull", "--run-cache"], clone, must=False)
        overrides = [arg for key, value in trial.point for arg in ("-S", f"{key}={value}")]
        cmd = ["dvc", "exp", "run", *overrides, "-S", f"train.sweep={trial.sweep}"]
        if not step("pipeline", [*cmd, "--name", trial.exp_name], clone):
            # bam's own one-line error if there is one, else DVC's.
            tail = _tail(log, 8000).splitlines()
            errors = [line.removeprefix("error: ") for line in tail if line.startswith("error:")]
            errors = errors or [line for line in tail if line.startswith("ERROR")]
            if errors:
                result["reason"] = errors[-1][:300]
            return result
        run_ref = _read_json(clone / "models" / "mlflow_run.json")
        fid = _read_json(clone / "metrics" / "fid.json")
        result["run_id"] = run_ref.get("run_id", "")
        result["model_version"] = run_ref.get("model_version", "")
        result["fid"] = fid.get("fid_classifier", fid.get("fid_inception"))
        if remote and not step("push", ["dvc", "push", "--run-cache"], clone):
            return result
        if not step("push", ["dvc", "exp", "push", "--no-cache", "origin", trial.exp_name], clone):
            return result
        result["status"] = "done"
        return result
    except Exception as exc:  # a broken node (no git, full disk...): this point fails, not all
        result["reason"] = f"{type(exc).__name__}: {reason(exc)}"
        return result
    finally:
        result["finished"] = time.time()
        result["seconds"] = result["finished"] - started
        result["log"] = _tail(log)
        shutil.rmtree(work, ignore_errors=True)


class Board:
    """A Ray actor on the driver's node: trials report when (and where) they start."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, str, float]] = []

    def started(self, index: int, node_id: str, host: str) -> None:
        self.events.append((index, node_id, host, time.time()))

    def drain(self) -> list[tuple[int, str, str, float]]:
        events, self.events = self.events, []
        return events


# ------------------------------------------------------------------------------ Ray
def _import_ray(local: bool) -> Any:
    if local and "ray" not in sys.modules:
        # A local instance listens on 127.0.0.1 only: Ray's "single-node" mode (its switch is
        # named for Windows/macOS, where that is the default).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        own = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE")
        if not own and not (Path.home() / ".ray" / "auth_token").is_file():
            # Token auth with a token that lives as long as this sweep's instance, rather
            # than one Ray would write into ~/.ray.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray


@contextlib.contextmanager
def connect(address: str | None, num_cpus: float, num_gpus: float) -> Iterator[Any]:
    """``ray.init`` (a new local instance when ``address`` is None), checked and shut down."""
    import logging

    local = address in (None, "", "local")
    ray = _import_ray(local)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if local:  # trials pass small dicts: a small object store is plenty
            ray.init(address="local", include_dashboard=False, object_store_memory=200 * 2**20,
                     **kwargs)  # fmt: skip
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:
        if local:
            raise BamError(f"cannot start a local Ray instance: {reason(exc)}") from None
        raise BamError(
            f"cannot reach the Ray cluster at {address}: {reason(exc)} (is `ray start --head`"
            " running there? With token auth, set RAY_AUTH_MODE=token and its token)"
        ) from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        fits = [
            n for n in nodes
            if n["Resources"].get("CPU", 0) >= num_cpus and n["Resources"].get("GPU", 0) >= num_gpus
        ]  # fmt: skip
        if not fits:
            have = ", ".join(
                f"{n['NodeManagerHostname']} ({n['Resources'].get('CPU', 0):g} CPU,"
                f" {n['Resources'].get('GPU', 0):g} GPU)"
                for n in nodes
            )
            raise BamError(
                f"no node of the Ray cluster has the {num_cpus:g} CPU and {num_gpus:g} GPU a"
                f" trial asks for (--num-cpus, --num-gpus); nodes: {have}"
            )
        yield ray
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------ the sweep
@dataclass
class Plan:
    """A checked sweep, before any Ray or MLflow work."""

    grid: list[str]
    points: list[tuple[tuple[str, str], ...]]
    name: str
    root: Path
    commit: str
    source: str
    cache_dir: str
    address: str | None
    num_cpus: float
    num_gpus: float

    @property
    def exp_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, len(self.points) + 1)]

    @property
    def grid_text(self) -> str:
        return " ".join(f"-S {option}" for option in self.grid)


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    results: list[dict[str, Any]]
    wall_seconds: float
    status: str  # FINISHED | FAILED | KILLED
    logs: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] != "done"]


def _venv_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def plan(
    grid: list[str],
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str | None = None,
    cwd: Path | None = None,
) -> Plan:
    """Every check that needs no cluster: grid, name, clean tree, params, where to clone."""
    points = parse_grid(grid)
    if num_cpus <= 0 or num_gpus < 0:
        raise BamError(f"--num-cpus must be > 0 and --num-gpus >= 0 (got {num_cpus}, {num_gpus})")
    name = name or default_name()
    if not NAME_RE.match(name) or name.endswith((".", ".lock")):
        raise BamError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names git refs),"
            " e.g. --name latent-z"
        )
    root = repo_root(cwd or Path.cwd())
    check_clean(root)

    from bam_vae.config import ConfigError, load_params

    for point in points:  # a bad value fails here, in one line, not in N trials
        try:
            load_params(root / "params.yaml", [f"{k}={v}" for k, v in point if ":" not in k])
        except ConfigError as exc:
            raise BamError(f"grid point {label(point)}: {exc}") from None
    commit = _git(root, "rev-parse", "HEAD")
    found = subprocess.run(["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True,
                           env=_venv_env())  # fmt: skip
    result = Plan(
        grid=list(grid), points=points, name=name, root=root, commit=commit,
        source=clone_source(root, commit),
        cache_dir=found.stdout.strip() or str(root / ".dvc" / "cache"),
        address=address or os.environ.get("RAY_ADDRESS") or None,
        num_cpus=num_cpus, num_gpus=num_gpus,
    )  # fmt: skip
    taken = existing_experiments(root, result.exp_names)
    if taken:
        raise BamError(f"experiments {', '.join(taken[:3])} exist already; pick another --name")
    return result


def run_sweep(
    grid: list[str],
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str | None = None,
    cwd: Path | None = None,
) -> SweepResult:
    """Run every grid point as a Ray task; print progress and the final table."""
    checked = plan(grid, address, num_cpus, num_gpus, name, cwd)
    os.chdir(checked.root)  # the tracking store is this checkout's (tracking.tracking_uri)
    from bam_vae import tracking

    uri = tracking.tracking_uri()
    experiment_id = tracking.init()  # an unreachable tracking server fails here
    with connect(checked.address, num_cpus, num_gpus) as ray:
        driver_ip = ray.util.get_node_ip_address()
        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        if hosts - {driver_ip}:
            if not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql")):
                raise BamError(
                    f"the Ray cluster has nodes on other machines ({', '.join(sorted(hosts))}),"
                    f" which cannot write the store {uri} of this machine; start a tracking"
                    " server and set MLFLOW_TRACKING_URI=http://... (docs/sweep.md)"
                )
            if checked.source == str(checked.root):
                raise BamError(
                    "the Ray cluster has nodes on other machines, which cannot clone this"
                    f" checkout ({checked.root}); add an `origin` git remote they reach, and push"
                )
        return _drive(ray, checked, uri, experiment_id, driver_ip)


def _short(node_id: str) -> str:
    return node_id[:8] if node_id else "-"


def table(results: list[dict[str, Any]]) -> str:
    """The final table: one line per grid point."""
    rows = [("#", "experiment", "point", "status", "node", "time", "FID")]
    for r in sorted(results, key=lambda r: r["index"]):
        node = f"{_short(r.get('node_id', ''))} ({r['host']})" if r.get("host") else "-"
        secs, fid = r.get("seconds"), r.get("fid")
        rows.append((
            str(r["index"]), r["exp_name"], r["point"], r["status"], node,
            f"{secs:.0f} s" if secs is not None else "-",
            f"{fid:.1f}" if isinstance(fid, int | float) else "-",
        ))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _missing(trial: Trial, status: str, why: str) -> dict[str, Any]:
    """The result of a trial that never returned one (cancelled, or lost with every retry)."""
    return {"index": trial.index, "point": label(trial.point), "exp_name": trial.exp_name,
            "status": status, "host": "", "node_id": "", "run_id": "", "fid": None,
            "reason": why, "log": "", "phases": {}}  # fmt: skip


def _drive(ray: Any, p: Plan, uri: str, experiment_id: str, driver_ip: str) -> SweepResult:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bam_vae import tracking

    client = tracking.client()
    parent = client.create_run(
        experiment_id,
        run_name=p.name,
        tags={
            "sweep": p.name, "bam_kind": "sweep", "sweep_grid": p.grid_text,
            "sweep_points": str(len(p.points)), "git_commit": p.commit,
            "mlflow.source.git.commit": p.commit, "ray_address": p.address or "local",
        },
    ).info.run_id  # fmt: skip
    t0 = time.monotonic()
    n = len(p.points)
    print(f"sweep {p.name}: {n} point{'s' * (n != 1)} ({p.grid_text}) at commit {p.commit[:10]};"
          f" parent run {parent} in {uri}", flush=True)  # fmt: skip

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f} s] {text}", flush=True)

    here = ray.get_runtime_context().get_node_id()
    board = (
        ray.remote(num_cpus=0)(Board)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        .remote()
    )
    task = ray.remote(max_retries=2, retry_exceptions=False)(run_trial).options(
        num_cpus=p.num_cpus, num_gpus=p.num_gpus
    )
    identity = git_identity(p.root)
    trials = [
        Trial(index=i + 1, point=point, sweep=p.name, exp_name=p.exp_names[i], source=p.source,
              commit=p.commit, tracking_uri=uri, parent_run_id=parent, num_cpus=p.num_cpus,
              driver_ip=driver_ip, root=str(p.root), cache_dir=p.cache_dir, env=identity)
        for i, point in enumerate(p.points)
    ]  # fmt: skip
    # Points that train the same model (they differ only outside model/train/data) run one
    # after another: the later ones restore it from DVC's run cache instead of training it
    # again side by side, which the train checkpoint's lock would refuse.
    chains: dict[tuple, deque[Trial]] = {}
    for t in trials:
        key = tuple((k, v) for k, v in t.point if k.split(":")[-1].startswith(TRAIN_KEYS))
        chains.setdefault(key, deque()).append(t)
    pending: dict[Any, tuple[Trial, tuple]] = {}

    def submit(chain_key: tuple) -> None:
        if chains[chain_key]:
            t = chains[chain_key].popleft()
            pending[task.remote(t, board)] = (t, chain_key)

    state = dict.fromkeys(range(1, n + 1), "pending")
    attempts: dict[int, int] = {}
    results: dict[int, dict[str, Any]] = {}

    def counts() -> str:
        values = list(state.values())
        return ", ".join(f"{values.count(s)} {s}" for s in ("pending", "running", "done", "failed")
                         if values.count(s))  # fmt: skip

    def started(events: list[tuple[int, str, str, float]]) -> None:
        for index, node_id, host, _ in events:
            attempts[index] = attempts.get(index, 0) + 1
            state[index] = "running"
            again = f", attempt {attempts[index]}" if attempts[index] > 1 else ""
            t = trials[index - 1]
            say(f"{t.exp_name} {label(t.point)}: running on node {_short(node_id)} ({host}"
                f"{again})  [{counts()}]")  # fmt: skip

    def ended(t: Trial, result: dict[str, Any]) -> None:
        result["attempts"] = attempts.get(t.index, 0)
        results[t.index] = result
        state[t.index] = "done" if result["status"] == "done" else "failed"
        if result["status"] != "done":
            what = f"FAILED: {result['reason']}"
        else:
            fid = result.get("fid")
            what = f"done in {result['seconds']:.0f} s" + (
                f", FID {fid:.1f}" if fid is not None else "")  # fmt: skip
        say(f"{t.exp_name} {label(t.point)}: {what}  [{counts()}]")

    status = "FINISHED"
    try:
        for chain_key in chains:
            submit(chain_key)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            events: list[tuple[int, str, str, float]] = []
            with contextlib.suppress(Exception):  # progress only: never stops the sweep
                events = ray.get(board.drain.remote(), timeout=10)
            # In the order things happened: trials that ended started first; the trials
            # that took their place start after.
            finished = {pending[ref][0].index for ref in ready}
            started([e for e in events if e[0] in finished])
            for ref in ready:
                t, chain_key = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # lost with every retry, or a Ray-level failure
                    result = _missing(t, "failed", f"{type(exc).__name__}: {reason(exc)}")
                ended(t, result)
                submit(chain_key)
            started([e for e in events if e[0] not in finished])
    except KeyboardInterrupt:
        status = "KILLED"
        say("interrupted: cancelling the unfinished trials; finished ones are kept")
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        with contextlib.suppress(Exception):  # let running trials stop their pipelines
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=STOP_GRACE_S + 20)
            for ref in ready:
                with contextlib.suppress(Exception):
                    t = pending[ref][0]
                    results[t.index] = ray.get(ref)
    finally:
        for t in trials:
            if t.index not in results:
                results[t.index] = _missing(t, "cancelled", "cancelled")
        ordered = [results[t.index] for t in trials]
        if status == "FINISHED" and any(r["status"] != "done" for r in ordered):
            status = "FAILED"
        logs = _finish(client, experiment_id, parent, ordered, status, p)
    wall = time.monotonic() - t0
    print()
    print(table(ordered))
    done = sum(r["status"] == "done" for r in ordered)
    print(f"\nsweep {p.name}: {done} of {n} done in {wall:.0f} s; parent run {parent} {status};"
          f" compare them with `bam report --sweep {p.name}`", flush=True)  # fmt: skip
    return SweepResult(p.name, parent, ordered, wall, status, logs)


def _settle(client: Any, experiment_id: str, parent: str, p: Plan, results: list[dict]) -> None:
    """Exactly one FINISHED run and one registered version per finished grid point.

    A trial whose node died may have left a run behind: RUNNING (its processes were killed
    before they could mark it), KILLED (its guard stopped it) or even FINISHED, with a
    registered version if it got that far, while its retry logged another run. The point's
    run is the one its successful attempt reported; the other runs of that point are marked
    KILLED (unless FAILED or KILLED already) and their versions deleted. Runs of a cancelled
    point (Ctrl-C) are marked KILLED, keeping their versions; a run still RUNNING once every
    trial has returned has no process left: KILLED too."""
    winners = {r["run_id"] for r in results if r["status"] == "done" and r["run_id"]}
    by_exp = {r["exp_name"]: r for r in results}
    for run in client.search_runs([experiment_id], f"tags.sweep = '{p.name}'"):
        tags, run_id, status = run.data.tags, run.info.run_id, run.info.status
        if tags.get("mlflow.parentRunId") != parent or run_id in winners:
            continue
        point = by_exp.get(tags.get("dvc_exp_name", ""), {})
        superseded = point.get("status") == "done"
        if superseded:
            why = f"superseded by run {point['run_id']}"
        elif point.get("status") == "cancelled":
            why = "its trial was cancelled"
        else:
            why = "its trial is gone"
        if status == "RUNNING" or (status == "FINISHED" and why != "its trial is gone"):
            client.set_terminated(run_id, status="KILLED")
            client.set_tag(run_id, "bam_sweep_settled", why)
            print(f"sweep: run {run_id} ({status}) marked KILLED: {why}", flush=True)
        if superseded:
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                client.delete_model_version(version.name, version.version)
                client.set_tag(run_id, "bam_sweep_settled", why)
                print(f"sweep: deleted {version.name} version {version.version} of run {run_id}"
                      f" ({why})", flush=True)  # fmt: skip


def _finish(client: Any, experiment_id: str, parent: str, results: list[dict], status: str,
            p: Plan) -> Path:  # fmt: skip
    """Keep every trial's log, settle duplicates, record the table, close the parent run."""
    logs = p.root / ".cache" / "sweeps" / p.name
    logs.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r.get("log"):
            (logs / f"{r['exp_name']}.log").write_text(r["log"])
    try:
        _settle(client, experiment_id, parent, p, results)
        slim = [{k: v for k, v in r.items() if k != "log"} for r in results]
        client.log_text(parent, table(results) + "\n", "sweep/table.txt")
        client.log_text(parent, json.dumps(slim, indent=2, default=str), "sweep/results.json")
        client.log_metric(parent, "points_done", sum(r["status"] == "done" for r in results))
        client.log_metric(parent, "points_failed", sum(r["status"] != "done" for r in results))
    finally:
        client.set_terminated(parent, status=status)
    return logs


def sweep(
    grid: list[str],
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str | None = None,
) -> SweepResult:
    """The ``bam sweep`` command: progress, the table, then one line and a non-zero exit if
    any point failed (with the last lines of its log)."""
    result = run_sweep(grid, address, num_cpus, num_gpus, name)
    if result.status == "KILLED":
        done = len(result.results) - len(result.failed)
        raise Interrupted(
            f"sweep {result.name} interrupted: {done} of {len(result.results)} points finished"
            f" and are kept, the others were cancelled; parent run {result.parent_run_id} KILLED"
        )
    if result.failed:
        for r in result.failed:
            lines = [line for line in r.get("log", "").splitlines() if line.strip()]
            if lines:
                print(f"\n--- {r['exp_name']} ({r['point']}): last lines of"
                      f" {result.logs / (r['exp_name'] + '.log')}")  # fmt: skip
                print("\n".join(lines[-8:]))
        names = ", ".join(r["exp_name"] for r in result.failed)
        raise BamError(
            f"sweep {result.name}: {len(result.failed)} of {len(result.results)} points failed"
            f" ({names}); logs in {result.logs}, parent run {result.parent_run_id} FAILED"
        )
    return result
