"""`bam sweep`: grid parsing and refusals (fast), and real sweeps on a real two-node Ray
cluster on this machine (slow): every point one FINISHED child run and one registered
version, experiments pushed to a bare origin, a node killed mid-sweep, a diverging point."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, copy_checkout, env_with_venv, free_port

from bam_vae.errors import BamError
from bam_vae.sweep import guard
from bam_vae.sweep.driver import _Progress, _Queue, _run
from bam_vae.sweep.git import dirty_files
from bam_vae.sweep.grid import label, parse_grid, split_values
from bam_vae.sweep.plan import plan
from bam_vae.sweep.settle import table
from bam_vae.sweep.trial import Trial, run_guarded

# Tiny trials on tiny data: the first 512/256 MNIST images (conftest's `tiny_mnist`) tracked
# with `dvc add` in place of the prepare-mnist stage (which insists on the full MNIST), one
# epoch, 64 samples scored. The tsne, robustness and inspect stages (leaves of the DAG, nothing
# reads them) are left out too, which halves a trial; the sweep runs every stage the project has.
TINY = {
    "model": {"z_dim": 3, "channels": [8, 16]},
    "train": {"epochs": 1, "train_fraction": 0.5, "batch_size": 64},
    "evaluator": {"epochs": 1},
    "generate": {"n": 64, "sampler": "prior"},
    "fid": {"kid_subsets": 5, "kid_subset_size": 50},
}
DROPPED_STAGES = ("prepare-mnist", "tsne", "robustness", "inspect")
DEADLINE = 900  # seconds for one sweep: catches hangs only (these machines can be very slow)


# ------------------------------------------------------------------------------ fast
def test_grid_is_the_product_of_the_options_in_their_order():
    points = parse_grid(["a=1,2", "b=x"])
    assert points == [(("a", "1"), ("b", "x")), (("a", "2"), ("b", "x"))]
    assert len(parse_grid(["model.z_dim=1,2,3", "train.k1=0.1,0.9"])) == 6
    # Lists and quoted strings are one value, as for `dvc exp run -S`.
    assert split_values("[classifier,inception],[classifier]") == [
        "[classifier,inception]",
        "[classifier]",
    ]
    assert parse_grid(["fid.features=[a,b]"]) == [(("fid.features", "[a,b]"),)]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert parse_grid(["params.yaml:train.lr=0.1"]) == [(("params.yaml:train.lr", "0.1"),)]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ([], "no grid"),
        (["a"], "expected KEY=V1,V2"),
        (["=1,2"], "is not a param key"),
        (["a b=1"], "is not a param key"),
        (["a=1,,2"], "empty value"),
        (["a="], "empty value"),
        (["a=[1,2"], "unclosed '['"),
        (["a=1]"], "unbalanced ']'"),
        (["a='x"], "unclosed quote"),
        (["a=1", "a=2"], "given twice"),
        (["model.z_dim=4,16,4"], "value 4 is given twice; list each once"),
        (["train.sweep=x"], "sets train.sweep itself"),
        (["train.lr=range(1,3)"], "range() sweeps are not supported"),
    ],
)
def test_bad_grid_is_one_line(options, says):
    with pytest.raises(BamError) as err:
        parse_grid(options)
    assert says in str(err.value) and "\n" not in str(err.value)


def _git_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env_with_venv(), check=True, capture_output=True)
    return root


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


def test_bad_values_and_names_fail_before_any_trial(tmp_path):
    root = _git_repo(tmp_path / "repo")
    with pytest.raises(BamError, match=r"grid point model\.z_dim=abc: model\.z_dim"):
        plan(["model.z_dim=2,abc"], cwd=root)
    with pytest.raises(BamError, match="--name 'a b'"):
        plan(["model.z_dim=2"], name="a b", cwd=root)
    with pytest.raises(BamError, match="--num-cpus must be > 0"):
        plan(["model.z_dim=2"], num_cpus=0, cwd=root)
    checked = plan(["model.z_dim=2,4", "train.lr=0.01"], name="s", cwd=root)
    assert checked.exp_names == ["s-1", "s-2"] and checked.source == str(root)


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
    signal.signal(signal.SIGTERM, lambda *_: (Path(sys.argv[1]).write_text("TERM"), sys.exit(0)))
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


@pytest.mark.parametrize(("on_term", "grace"), [("exit", 60.0), ("ignore", 1.0)])
def test_the_guard_stops_its_group_and_removes_the_work_folder_when_its_parent_dies(
    tmp_path, on_term, grace
):
    """SIGKILL the guard's parent: the guard SIGTERMs its process group, waits for it (not the
    whole grace once the group has exited), removes the work folder, and SIGKILLs what is left
    once the grace is over."""
    work, marker = tmp_path / "work", tmp_path / "terminated"
    (work / "repo").mkdir(parents=True)
    cmd = [sys.executable, "-c", GUARDED, str(marker), on_term]
    worker = subprocess.Popen([sys.executable, "-c", WORKER, guard.__file__, str(work),
                               str(grace), *cmd], stdout=subprocess.PIPE, text=True)  # fmt: skip
    group = int(worker.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while len(guard.members(group)) < 3:  # the guard, the command, its child
            assert time.monotonic() < deadline, "the guarded command did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # the guard keeps running while its parent lives
        assert len(guard.members(group)) == 3 and work.is_dir()

        worker.kill()
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


def test_the_driver_chains_points_that_train_the_same_model_and_says_what_happens(capsys):
    """The driver's loop with a stand-in for Ray: the first trial of each chain starts at
    once, the next when it ends; a trial lost with every retry fails alone; the table and
    the records have every point."""
    points = parse_grid(["model.z_dim=1,2", "generate.n=8,16"])
    trials = [Trial(index=i, point=pt, sweep="s", exp_name=f"s-{i}", source="", commit="",
                    tracking_uri="", parent_run_id="", num_cpus=1, driver_ip="", root="",
                    cache_dir="") for i, pt in enumerate(points, 1)]  # fmt: skip

    submitted: list[int] = []
    events: list[tuple] = []  # on the board: trials that started

    class Task:  # ray.remote(run_trial)
        def remote(self, t: Trial, board: object) -> int:
            submitted.append(t.index)
            events.append((t.index, "nodeid-0123456789", "host", 0.0))
            return t.index  # its "object ref"

    class Board:  # the Board actor: board.drain.remote()
        class drain:  # noqa: N801
            @staticmethod
            def remote() -> list[tuple]:
                drained = events[:]
                events.clear()
                return drained

    class Ray:
        def wait(self, refs: list, num_returns: int, timeout: float) -> tuple[list, list]:
            return refs, []  # all of them ready

        def get(self, ref: int | list, timeout: float | None = None) -> object:
            if isinstance(ref, list):  # the board's events
                return ref
            if ref == 3:
                raise RuntimeError("node lost")
            t = trials[ref - 1]
            return {"index": t.index, "point": label(t.point), "exp_name": t.exp_name,
                    "status": "done", "host": "host", "node_id": "nodeid-0123456789",
                    "seconds": 2.0, "fid": 1.5, "run_id": "", "reason": ""}  # fmt: skip

    ray = Ray()
    queue, progress = _Queue(trials, Task(), Board()), _Progress(trials, time.monotonic())
    _run(ray, queue, progress)
    assert submitted == [1, 3, 2, 4]  # z_dim=1: 1 then 2; z_dim=2: 3 then 4
    said = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    node = "running on node nodeid-0 (host)"
    assert said == [
        f"s-1 model.z_dim=1 generate.n=8: {node}  [3 pending, 1 running]",
        f"s-3 model.z_dim=2 generate.n=8: {node}  [2 pending, 2 running]",
        "s-1 model.z_dim=1 generate.n=8: done in 2 s, FID 1.5  [2 pending, 1 running, 1 done]",
        "s-3 model.z_dim=2 generate.n=8: FAILED: RuntimeError: node lost"
        "  [2 pending, 1 done, 1 failed]",
        f"s-2 model.z_dim=1 generate.n=16: {node}  [1 pending, 1 running, 1 done, 1 failed]",
        f"s-4 model.z_dim=2 generate.n=16: {node}  [2 running, 1 done, 1 failed]",
        "s-2 model.z_dim=1 generate.n=16: done in 2 s, FID 1.5  [1 running, 2 done, 1 failed]",
        "s-4 model.z_dim=2 generate.n=16: done in 2 s, FID 1.5  [3 done, 1 failed]",
    ]
    results = progress.ordered()
    assert [(r["exp_name"], r["status"], r.get("attempts")) for r in results] == [
        ("s-1", "done", 1), ("s-2", "done", 1), ("s-3", "failed", 1), ("s-4", "done", 1)
    ]  # fmt: skip
    assert len(table(results).splitlines()) == 2 + 4


# ------------------------------------------------------------------------------ slow
def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env or env_with_venv(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def make_project(dst: Path, data: Path) -> Path:
    """This repository's tracked files with tiny params and tiny data, committed and pushed to
    a bare origin, a folder as DVC remote, and the stages every trial shares (evaluator, FID
    reference) computed once, pushed and locked."""
    root = copy_checkout(dst / "project", TINY, DROPPED_STAGES)
    shutil.copytree(data, root / "data" / "prepared")
    run(["git", "init", "-q", "--bare", "-b", "main", str(dst / "origin.git")], dst)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "remote", "add", "origin", str(dst / "origin.git")], root)
    run(["dvc", "remote", "add", "-d", "store", str(dst / "dvc-store")], root)
    run(["dvc", "add", "data/prepared"], root)
    run(["dvc", "repro", "fid-reference@classifier"], root)  # evaluator, reference
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

    def __init__(self) -> None:
        self.marker = secrets.token_hex(8)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env_with_venv() | {
            "BAM_TEST_RAY_CLUSTER": self.marker,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
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


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_over_two_nodes(sweep_project, cluster):
    project = sweep_project
    code, out = sweep(project, ["-S", "model.z_dim=1,2,3,4", "--name", "grid",
                                "--address", cluster.address], cluster.env)  # fmt: skip
    assert code == 0, out
    parent = parent_of(out)
    runs = children(project, parent)
    assert sorted(s for _, s, _ in runs) == ["FINISHED"] * 4
    assert sorted(e for _, _, e in runs) == ["grid-1", "grid-2", "grid-3", "grid-4"]
    assert rows(project, "select status from runs where run_uuid = ?", parent) == [("FINISHED",)]
    assert ("sweep", "grid") in rows(project, "select key, value from tags where run_uuid = ?",
                                     parent)  # fmt: skip
    assert len(versions(project, [r for r, _, _ in runs])) == 4
    # The table: one line per point, each done, on both nodes.
    table = out[out.index("#  experiment") :]
    assert len(re.findall(r"^\d  grid-\d .* done ", table, re.M)) == 4, table
    used = set(re.findall(r"\b([0-9a-f]{8}) \(", table))
    assert used == {cluster.head[:8], cluster.second[:8]}, table

    # The experiments are in the origin, with their outputs in the DVC remote.
    listed = run(["dvc", "exp", "list", "origin", "--names-only"], project).split()
    assert sorted(listed) == ["grid-1", "grid-2", "grid-3", "grid-4"]
    fresh = project.parent / "fresh"
    run(["git", "clone", "-q", str(project.parent / "origin.git"), str(fresh)], project.parent)
    run(["dvc", "exp", "pull", "origin", "grid-3"], fresh)
    run(["dvc", "exp", "apply", "grid-3"], fresh)
    assert yaml.safe_load((fresh / "params.yaml").read_text())["model"]["z_dim"] == 3
    run(["dvc", "pull", "models/vae.pt"], fresh)
    assert (fresh / "models/vae.pt").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_node_dies_mid_sweep(sweep_project, cluster):
    """The second node's raylet is killed while one of its trials trains: Ray retries that
    trial elsewhere and every point still ends with exactly one FINISHED run and version."""
    project = sweep_project
    victim: dict[str, str] = {}

    def on_line(line: str) -> None:
        found = re.search(rf"(dead-\d) \S+: running on node {cluster.second[:8]}", line)
        if found and "exp" not in victim:
            victim["exp"] = found.group(1)

    def kill_when_training() -> None:
        # Wait until the victim's MLflow run is open (it is training), then kill the node.
        deadline = time.monotonic() + 120
        while "exp" not in victim or not rows(
            project,
            "select 1 from runs r join tags t on t.run_uuid = r.run_uuid and"
            " t.key = 'dvc_exp_name' where t.value = ? and r.status = 'RUNNING'",
            victim.get("exp", ""),
        ):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cluster.kill_node(1)
        victim["killed"] = "yes"
        cluster.third = cluster.start_node()  # a replacement, so the rest is not serial

    import threading

    def watch(line: str, _proc) -> None:
        on_line(line)
        if "exp" in victim and "thread" not in victim:
            victim["thread"] = "started"
            threading.Thread(target=kill_when_training, daemon=True).start()

    before = set(Path(tempfile.gettempdir()).glob("bam-dead-*"))
    code, out = sweep(project, ["-S", "model.z_dim=5,6,7,8", "--name", "dead",
                                "--address", cluster.address], cluster.env, watch)  # fmt: skip
    assert victim.get("killed") == "yes", out
    assert code == 0, out
    assert re.search(rf"{victim['exp']} \S+: running on node \w+ \(\S+, attempt 2\)", out), out
    runs = children(project, parent_of(out))
    finished = [(r, e) for r, s, e in runs if s == "FINISHED"]
    assert sorted(e for _, e in finished) == ["dead-1", "dead-2", "dead-3", "dead-4"], runs
    assert {s for _, s, _ in runs} <= {"FINISHED", "KILLED", "FAILED"}, runs
    live = versions(project, [r for r, _, _ in runs])
    assert sorted(r for r, _ in live) == sorted(r for r, _ in finished)
    # The dead attempt's guard removed its clone; the retry's task removed its own.
    assert not set(Path(tempfile.gettempdir()).glob("bam-dead-*")) - before


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_diverging_point_fails_alone_on_a_local_instance(sweep_project):
    """No --address: a local Ray instance of this machine's cores. The diverging point is
    reported failed with its reason, the other finishes, and the exit status is non-zero."""
    project = sweep_project
    env = env_with_venv()
    env.pop("RAY_ADDRESS", None)
    code, out = sweep(project, ["-S", "train.lr=1e9,0.001", "--name", "diverge"], env)
    assert code == 2, out
    assert re.search(r"diverge-1 train.lr=1e9: FAILED: train: loss is (nan|inf)", out), out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("error: sweep diverge: 1 of 2 points failed (diverge-1)")
    ), out
    runs = {e: s for _, s, e in children(project, parent_of(out))}
    assert runs == {"diverge-1": "FAILED", "diverge-2": "FINISHED"}
    assert rows(project, "select status from runs where run_uuid = ?", parent_of(out)) == [
        ("FAILED",)
    ]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ctrl_c_cancels_the_trials_and_kills_the_parent_run(sweep_project):
    """Ctrl-C (SIGINT to the process group) as soon as the first trial runs: every trial is
    cancelled and stops its pipeline, nothing is left behind, the parent run is KILLED."""
    project = sweep_project
    env = env_with_venv()
    env.pop("RAY_ADDRESS", None)
    before = set(Path(tempfile.gettempdir()).glob("bam-stop-*"))

    def interrupt(line: str, proc: subprocess.Popen) -> None:
        if ": running on node" in line:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)

    code, out = sweep(project, ["-S", "model.z_dim=11,12,13", "--name", "stop"], env, interrupt)
    assert code == 130, out
    assert "interrupted: cancelling the unfinished trials" in out
    assert out.strip().splitlines()[-1].startswith("error: sweep stop interrupted: 0 of 3"), out
    assert len(re.findall(r"^\d  stop-\d .* cancelled ", out, re.M)) == 3, out
    parent = parent_of(out)
    assert rows(project, "select status from runs where run_uuid = ?", parent) == [("KILLED",)]
    assert {s for _, s, _ in children(project, parent)} <= {"KILLED", "FAILED"}
    assert not set(Path(tempfile.gettempdir()).glob("bam-stop-*")) - before
