"""One trial, run as a Ray task on whichever node Ray chose (:func:`run_trial`).

It clones the repository at the sweep's commit into a fresh folder on its node, pulls what a
DVC remote has, runs ``dvc exp run STAGE -S ... --name <sweep>-<n>`` there (the stage that
writes the study's metric, and what it needs) with the sweep's tracking store, parent run and
trial number in its environment, pushes the results (DVC remote, git ``origin``) and removes
the clone. Trials on the sweep's own machine share its DVC cache (and
so its run cache) instead.

This module imports nothing heavy (no torch, no MLflow; Ray only inside the task): Ray
workers import it to run the task. The pipeline runs as subprocesses of this interpreter's
``bin`` folder, the clone's ``src`` first on ``PYTHONPATH`` so the code that runs is the code
of the sweep's commit, each under the guard (:mod:`bam_vae.sweep.guard`) in a process group
of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bam_vae.errors import reason
from bam_vae.machine import available_cores
from bam_vae.processes import stop_group
from bam_vae.sweep import guard

LOG_TAIL = 20_000  # characters of a trial's log that come back to the driver
STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL for a trial's process group


@dataclass(frozen=True)
class Trial:
    """Everything a Ray task needs to run one trial, on any node."""

    number: int  # the Optuna trial's
    overrides: tuple[str, ...]  # KEY=VALUE for `dvc exp run -S`
    sweep: str
    exp_name: str
    stage: str  # the dvc.yaml stage that writes the study's metric
    source: str  # git URL or path to clone
    commit: str
    tracking_uri: str
    parent_run_id: str
    num_cpus: float
    driver_ip: str  # nodes at this IP share the sweep's filesystem
    driver_pid: int  # the guard of a trial on the driver's machine watches it too
    root: str  # the sweep's checkout, on the driver's machine
    cache_dir: str  # its DVC cache, shared by the trials on that machine
    env: dict[str, str] = field(default_factory=dict)  # git identity, BAM_ARTIFACT_ROOT


def run_guarded(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, work: Path) -> int:
    """Run ``cmd`` under the guard, output appended to ``log``; returns its exit status.

    The guard runs by its file path (``-P``: its folder is not put on ``sys.path``), not as
    ``-m bam_vae.sweep.guard``, which would import the clone's ``bam_vae`` (``env``'s
    ``PYTHONPATH``) or none. A KeyboardInterrupt here (``ray.cancel`` of a running trial)
    stops the whole group."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        guarded = [sys.executable, "-P", guard.__file__, str(work), str(STOP_GRACE_S), *cmd]
        proc = subprocess.Popen(guarded, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            while True:  # short waits: Ray delivers a cancel between two Python bytecodes
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=0.5)
        except BaseException:
            stop_group(proc, STOP_GRACE_S)
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
    env["BAM_TRIAL"] = str(trial.number)
    env["BAM_PARALLEL_JOBS"] = str(max(1, int(available_cores() // max(trial.num_cpus, 1e-9))))
    return env


class _Attempt:
    """One attempt at a trial in a fresh work folder: its commands, each under the guard,
    their seconds by phase and the outcome in ``result``."""

    def __init__(self, trial: Trial, result: dict[str, Any]) -> None:
        self.trial, self.result = trial, result
        self.work = Path(tempfile.mkdtemp(prefix=f"bam-{trial.exp_name}-"))
        self.log, self.clone = self.work / "trial.log", self.work / "repo"
        self.env = trial_env(trial, self.clone)

    def step(self, phase: str, cmd: list[str], cwd: Path, must: bool = True) -> bool:
        """Run ``cmd``; True if it succeeded. A ``must`` step that fails gives the reason."""
        t0 = time.monotonic()
        rc = run_guarded(cmd, cwd, self.env, self.log, self.work)
        phases = self.result["phases"]
        phases[phase] = phases.get(phase, 0.0) + time.monotonic() - t0
        if rc and must:
            self.result["reason"] = f"{phase}: `{' '.join(cmd[:4])}` exited with status {rc}"
        return rc == 0

    def run(self, same_host: bool) -> None:
        """Clone, pull, run the pipeline, push; ``result`` says how far it got."""
        trial, clone, result = self.trial, self.clone, self.result
        fetch = ["git", "clone", "--quiet", "--no-checkout", trial.source, str(clone)]
        if not (
            self.step("clone", fetch, self.work)
            and self.step("clone", ["git", "checkout", "--quiet", trial.commit], clone)
        ):
            return
        if same_host:  # trials on this machine share the checkout's cache and run cache
            self.env[guard.DRIVER_ENV] = str(trial.driver_pid)
            self.step("clone", ["dvc", "cache", "dir", "--local", trial.cache_dir], clone)
        remote = self.step("remote", ["dvc", "remote", "default"], clone, must=False)
        if remote:  # what it cannot pull it recomputes
            self.step("pull", ["dvc", "pull", "--run-cache"], clone, must=False)
        overrides = [arg for option in trial.overrides for arg in ("-S", option)]
        cmd = ["dvc", "exp", "run", trial.stage, *overrides, "-S", f"sweep.name={trial.sweep}"]
        if not self.step("pipeline", [*cmd, "--name", trial.exp_name], clone):
            # bam's own one-line error if there is one, else DVC's.
            tail = _tail(self.log, 8000).splitlines()
            errors = [line.removeprefix("error: ") for line in tail if line.startswith("error:")]
            errors = errors or [line for line in tail if line.startswith("ERROR")]
            if errors:
                result["reason"] = errors[-1][:300]
            return
        result["run_id"] = _read_json(clone / "models" / "mlflow_run.json").get("run_id", "")
        result["metrics"] = metrics(clone)
        if remote and not self.step("push", ["dvc", "push", "--run-cache"], clone):
            return
        push = ["dvc", "exp", "push", "--no-cache", "origin", trial.exp_name]
        if not self.step("push", push, clone):
            return
        result["status"] = "done"


def numbers(path: Path) -> dict[str, float]:
    """The numbers at the top level of a metrics file (JSON); {} if it is missing or bad."""
    found = _read_json(path).items()
    return {k: float(v) for k, v in found if isinstance(v, int | float) and not isinstance(v, bool)}


def metrics(clone: Path) -> dict[str, float]:
    """Every number at the top level of the checkout's ``metrics/*.json``: what ``--metric``
    may name."""
    return {
        k: v
        for path in sorted((clone / "metrics").glob("*.json"))
        for k, v in numbers(path).items()
    }


def run_trial(trial: Trial) -> dict[str, Any]:
    """One trial, on whichever node Ray chose (the body of the Ray task): what it measured
    (``metrics``), its MLflow run, and how it ended."""
    import ray  # already imported in a Ray worker

    started = time.time()
    node_id = ray.get_runtime_context().get_node_id()
    host = socket.gethostname()
    node_ip = ray.util.get_node_ip_address()
    same_host = node_ip == trial.driver_ip and Path(trial.root, ".dvc").is_dir()
    result: dict[str, Any] = {
        "status": "failed", "node_id": node_id, "host": host, "run_id": "", "metrics": {},
        "reason": "", "phases": {}, "log": "",
    }  # fmt: skip
    attempt = _Attempt(trial, result)
    try:
        attempt.run(same_host)
    except Exception as exc:  # a broken node (no git, full disk...): this point fails, not all
        result["reason"] = f"{type(exc).__name__}: {reason(exc)}"
    finally:
        result["seconds"] = time.time() - started
        result["log"] = _tail(attempt.log)
        shutil.rmtree(attempt.work, ignore_errors=True)
    return result
