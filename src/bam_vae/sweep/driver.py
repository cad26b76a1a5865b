"""``bam sweep``: a grid of DVC experiments run as Ray tasks, one MLflow parent run above them.

The driver checks the sweep (:mod:`~bam_vae.sweep.plan`), connects to Ray, opens the parent
run and runs each grid point as one Ray task (:func:`bam_vae.sweep.trial.run_trial`), saying
where each starts and how it ends. Every trial's commands run under a guard
(:mod:`bam_vae.sweep.guard`): if its Ray worker dies (its node's raylet is killed), the guard
stops the pipeline (SIGTERM: ``bam train`` marks its run KILLED) and removes the clone, so a
dead attempt never runs on beside its retry. Whatever a dead attempt left in MLflow is settled
at the end (:mod:`~bam_vae.sweep.settle`): one FINISHED run and one registered version per
grid point. Ray is imported lazily, so ``bam sweep --help`` and the grid checks cost nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam_vae.errors import BamError, Interrupted, reason
from bam_vae.sweep.git import git_identity
from bam_vae.sweep.grid import Point, label, training_params
from bam_vae.sweep.plan import Plan, plan
from bam_vae.sweep.settle import finish, short_node, table
from bam_vae.sweep.trial import STOP_GRACE_S, Trial, missing_result, run_trial

Event = tuple[int, str, str, float]  # a trial started: (index, node id, host, time)


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


def _check_reach(ray: Any, checked: Plan, uri: str, driver_ip: str) -> None:
    """Nodes on other machines must reach the tracking store and the commit."""
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if not hosts - {driver_ip}:
        return
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


class Board:
    """A Ray actor on the driver's node: trials report when (and where) they start."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def started(self, index: int, node_id: str, host: str) -> None:
        self.events.append((index, node_id, host, time.time()))

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events


# ------------------------------------------------------------------------------ the sweep
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
    from bam_vae.tracking import store as tracking

    uri = tracking.tracking_uri()
    experiment_id = tracking.init()  # an unreachable tracking server fails here
    with connect(checked.address, num_cpus, num_gpus) as ray:
        driver_ip = ray.util.get_node_ip_address()
        _check_reach(ray, checked, uri, driver_ip)
        return _drive(ray, checked, uri, experiment_id, driver_ip)


class _Queue:
    """The trials to run and those in flight. Points that train the same model (they differ
    only outside model/train/data) form a chain and run one after another: the later ones
    restore it from DVC's run cache instead of training it again side by side, which the
    train checkpoint's lock would refuse."""

    def __init__(self, trials: list[Trial], task: Any, board: Any) -> None:
        self.task, self.board = task, board
        self.chains: dict[Point, deque[Trial]] = {}
        for t in trials:
            self.chains.setdefault(training_params(t.point), deque()).append(t)
        self.pending: dict[Any, tuple[Trial, Point]] = {}  # Ray ref -> its trial, its chain

    def submit(self, chain: Point) -> None:
        """Start the next trial of ``chain``, if any is left."""
        if self.chains[chain]:
            t = self.chains[chain].popleft()
            self.pending[self.task.remote(t, self.board)] = (t, chain)


class _Progress:
    """What the driver knows of each trial (state, attempts, result) and says of it, with the
    seconds since ``t0``."""

    def __init__(self, trials: list[Trial], t0: float) -> None:
        self.trials, self.t0 = trials, t0
        self.state = dict.fromkeys((t.index for t in trials), "pending")
        self.attempts: dict[int, int] = {}
        self.results: dict[int, dict[str, Any]] = {}

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f} s] {text}", flush=True)

    def counts(self) -> str:
        values = list(self.state.values())
        return ", ".join(f"{values.count(s)} {s}" for s in ("pending", "running", "done", "failed")
                         if values.count(s))  # fmt: skip

    def started(self, events: list[Event]) -> None:
        for index, node_id, host, _ in events:
            self.attempts[index] = self.attempts.get(index, 0) + 1
            self.state[index] = "running"
            again = f", attempt {self.attempts[index]}" if self.attempts[index] > 1 else ""
            t = self.trials[index - 1]
            self.say(f"{t.exp_name} {label(t.point)}: running on node {short_node(node_id)}"
                     f" ({host}{again})  [{self.counts()}]")  # fmt: skip

    def ended(self, t: Trial, result: dict[str, Any]) -> None:
        result["attempts"] = self.attempts.get(t.index, 0)
        self.results[t.index] = result
        self.state[t.index] = "done" if result["status"] == "done" else "failed"
        if result["status"] != "done":
            what = f"FAILED: {result['reason']}"
        else:
            fid = result.get("fid")
            what = f"done in {result['seconds']:.0f} s" + (
                f", FID {fid:.1f}" if fid is not None else "")  # fmt: skip
        self.say(f"{t.exp_name} {label(t.point)}: {what}  [{self.counts()}]")

    def ordered(self) -> list[dict[str, Any]]:
        """Every trial's result in grid order; a trial without one was cancelled."""
        for t in self.trials:
            if t.index not in self.results:
                self.results[t.index] = missing_result(t, "cancelled", "cancelled")
        return [self.results[t.index] for t in self.trials]


def _run(ray: Any, queue: _Queue, progress: _Progress) -> None:
    """Start the first trial of every chain, then, as each ends, the next of its chain."""
    for chain in queue.chains:
        queue.submit(chain)
    while queue.pending:
        pending = list(queue.pending)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        events: list[Event] = []
        with contextlib.suppress(Exception):  # progress only: never stops the sweep
            events = ray.get(queue.board.drain.remote(), timeout=10)
        # In the order things happened: trials that ended started first; the trials that
        # took their place start after.
        finished = {queue.pending[ref][0].index for ref in ready}
        progress.started([e for e in events if e[0] in finished])
        for ref in ready:
            t, chain = queue.pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # lost with every retry, or a Ray-level failure
                result = missing_result(t, "failed", f"{type(exc).__name__}: {reason(exc)}")
            progress.ended(t, result)
            queue.submit(chain)
        progress.started([e for e in events if e[0] not in finished])


def _cancel(ray: Any, queue: _Queue, progress: _Progress) -> None:
    """Ctrl-C: cancel the trials in flight and keep what those that stop in time return."""
    progress.say("interrupted: cancelling the unfinished trials; finished ones are kept")
    for ref in queue.pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    with contextlib.suppress(Exception):  # let running trials stop their pipelines
        pending = list(queue.pending)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S + 20)
        for ref in ready:
            with contextlib.suppress(Exception):
                t = queue.pending[ref][0]
                progress.results[t.index] = ray.get(ref)


def _remotes(ray: Any, p: Plan) -> tuple[Any, Any]:
    """The Ray task that runs a trial, and the board, on this node, that hears them start."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    board = (
        ray.remote(num_cpus=0)(Board)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        .remote()
    )
    task = ray.remote(max_retries=2, retry_exceptions=False)(run_trial).options(
        num_cpus=p.num_cpus, num_gpus=p.num_gpus
    )
    return task, board


def _drive(ray: Any, p: Plan, uri: str, experiment_id: str, driver_ip: str) -> SweepResult:
    from bam_vae.tracking import store as tracking

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
    task, board = _remotes(ray, p)
    identity = git_identity(p.root)
    # The store's artifact folder, where the user named one: every trial writes there too.
    if os.environ.get(tracking.ARTIFACT_ROOT_ENV):
        identity[tracking.ARTIFACT_ROOT_ENV] = str(tracking.artifact_root())
    trials = [
        Trial(index=i + 1, point=point, sweep=p.name, exp_name=p.exp_names[i], source=p.source,
              commit=p.commit, tracking_uri=uri, parent_run_id=parent, num_cpus=p.num_cpus,
              driver_ip=driver_ip, root=str(p.root), cache_dir=p.cache_dir, env=identity)
        for i, point in enumerate(p.points)
    ]  # fmt: skip
    queue, progress = _Queue(trials, task, board), _Progress(trials, t0)
    status = "FINISHED"
    try:
        _run(ray, queue, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        _cancel(ray, queue, progress)
    finally:
        ordered = progress.ordered()
        if status == "FINISHED" and any(r["status"] != "done" for r in ordered):
            status = "FAILED"
        logs = finish(client, experiment_id, parent, ordered, status, p.root, p.name)
    wall = time.monotonic() - t0
    print()
    print(table(ordered))
    done = sum(r["status"] == "done" for r in ordered)
    print(f"\nsweep {p.name}: {done} of {n} done in {wall:.0f} s; parent run {parent} {status};"
          f" compare them with `bam report --sweep {p.name}`", flush=True)  # fmt: skip
    return SweepResult(p.name, parent, ordered, wall, status, logs)


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
