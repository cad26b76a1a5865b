"""What ``bam sweep`` costs around the pipeline: per trial (clone, pull, push, the study's
bookkeeping) and per study (Ray, the study, the parent run), on a tiny project on this
machine.

1. The same tiny trial twice: ``dvc exp run`` alone in a checkout, then as a one-point
   ``bam sweep`` on a one-node cluster; the trial's own timings (the study's ``phases``)
   split clone, DVC remote check and pull, the pipeline, and the pushes.
2. ``--points`` tiny points (8) on one node, then on two nodes (another ``ray start`` on this
   machine). Nodes here share the same cores, so this shows what scheduling costs, not a
   speed-up: the wait before the first trial starts, and the gap between one trial ending
   and the next starting.

The project is a copy of this repository with tiny params and data (the first 512/256 MNIST
images, tracked with ``dvc add``), a bare git origin and a folder as DVC remote.

    python bench/sweep_overhead.py [--points 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny project is the sweep tests' own


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    for var in ("GIT_AUTHOR", "GIT_COMMITTER"):
        base.setdefault(f"{var}_NAME", "bam-vae bench")
        base.setdefault(f"{var}_EMAIL", "bench@bam-vae.invalid")
    return base | extra


def sh(cmd: list[str], cwd: Path, environ: dict[str, str] | None = None) -> float:
    """Run ``cmd``; seconds it took. Its output only if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=environ or env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def make_project(dst: Path) -> Path:
    """The sweep tests' tiny project (first 512/256 MNIST images, tiny params, origin, remote)."""
    from conftest import write_tiny
    from test_sweep import make_project as tiny_project

    from bam_vae.config import DataConfig
    from bam_vae.stages.prepare import prepare

    full = dst / "full"
    prepare(DataConfig(out_dir=str(full), sources=["package"]), metrics_path=full / "data.json")
    data = write_tiny(full, dst / "tiny", 512, 256)
    shutil.rmtree(full)
    return tiny_project(dst, data)


class Cluster:
    """``ray start`` nodes of 1 CPU on this machine; stops exactly the processes it started."""

    def __init__(self) -> None:
        self.marker = secrets.token_hex(8)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        token = secrets.token_hex(16)
        self.env = env(BAM_BENCH_RAY=self.marker, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                       RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
        self.dirs: list[Path] = []

    def start_node(self) -> float:
        temp = Path(tempfile.mkdtemp(prefix="bamray-", dir="/tmp"))
        self.dirs.append(temp)
        cmd = ["ray", "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(temp), "--object-store-memory", str(100 * 2**20),
               "--disable-usage-stats"]  # fmt: skip
        if len(self.dirs) == 1:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:
            cmd += ["--address", self.address]
        return sh(cmd, temp, self.env)

    def stop(self) -> None:
        """SIGKILL every process carrying the marker and their descendants (Ray's agents and
        workers rename themselves, which overwrites the environment that holds the marker)."""
        import psutil

        needle = f"BAM_BENCH_RAY={self.marker}".encode()
        for _ in range(3):
            for pid in os.listdir("/proc"):
                with contextlib.suppress(OSError, ValueError, psutil.Error):
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                    if int(pid) != os.getpid() and needle in environ:
                        root = psutil.Process(int(pid))
                        for proc in [*root.children(recursive=True), root]:
                            with contextlib.suppress(psutil.Error):
                                proc.kill()
            time.sleep(0.5)
        for temp in self.dirs:
            shutil.rmtree(temp, ignore_errors=True)


def sweep(root: Path, points: list[int], name: str, cluster: Cluster) -> tuple[float, list]:
    """``bam sweep`` over ``model.z_dim`` = ``points`` on ``cluster``: (wall seconds from the
    command's start, the study's trials)."""
    import optuna

    from bam_vae.sweep.study import open_storage

    grid = f"model.z_dim={','.join(map(str, points))}"
    start = time.time()
    sh(["bam", "sweep", "--name", name, "-S", grid, "--address", cluster.address], root,
       cluster.env)  # fmt: skip
    wall = time.time() - start
    study = optuna.load_study(study_name=name, storage=open_storage(None, root)[0])
    for t in study.trials:
        t.user_attrs["start"] = t.datetime_start.timestamp() - start
        t.user_attrs["end"] = t.datetime_complete.timestamp() - start
    return wall, study.trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=8, help="grid points for part 2")
    args = parser.parse_args()
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="bam-bench-sweep-") as tmp:
        t0 = time.perf_counter()
        root = make_project(Path(tmp))
        print(f"tiny project ready in {time.perf_counter() - t0:.0f} s", flush=True)

        # 1. The pipeline alone (its own checkout, no Ray), then the same trial through Ray.
        plain = Path(tmp) / "plain"
        sh(["git", "clone", "-q", str(root), str(plain)], Path(tmp))
        sh(["dvc", "cache", "dir", "--local", str(root / ".dvc" / "cache")], plain)
        alone = sh(["dvc", "exp", "run", "compute-fid", "-S", "model.z_dim=2"], plain)
        cluster = Cluster()
        try:
            head_start = cluster.start_node()
            one_wall, (trial,) = sweep(root, [2], "one", cluster)
            on_one = sweep(root, list(range(11, 11 + args.points)), "one-node", cluster)
            node_start = cluster.start_node()
            on_two = sweep(root, list(range(31, 31 + args.points)), "two-nodes", cluster)
        finally:
            cluster.stop()

    phases = trial.user_attrs["phases"]
    print("\n1. one tiny trial (z = 2): the pipeline alone vs through bam sweep")
    rows = [
        ("dvc exp run alone (no Ray, a checkout sharing the cache)", alone),
        ("through Ray: git clone + checkout + dvc cache dir", phases.get("clone", 0)),
        ("through Ray: dvc remote default + dvc pull --run-cache",
         phases.get("remote", 0) + phases.get("pull", 0)),
        ("through Ray: the pipeline (dvc exp run)", phases.get("pipeline", 0)),
        ("through Ray: dvc push --run-cache + dvc exp push origin", phases.get("push", 0)),
        ("through Ray: the whole task", trial.user_attrs["seconds"]),
        ("the trial in the study (task + MLflow child run, Optuna)",
         trial.user_attrs["end"] - trial.user_attrs["start"]),
        ("command start to trial start (Ray, study, parent run)", trial.user_attrs["start"]),
        ("one-point bam sweep, whole command", one_wall),
    ]  # fmt: skip
    for what, secs in rows:
        print(f"  {what:<62} {secs:6.1f} s")
    overhead = trial.user_attrs["end"] - trial.user_attrs["start"] - phases.get("pipeline", 0)
    print(f"  per-trial overhead around the pipeline: {overhead:.1f} s"
          f" ({100 * overhead / phases.get('pipeline', 1):.0f} % of it)")  # fmt: skip

    print(f"\n2. {args.points} tiny points (ray start nodes of 1 CPU on this 2-core machine)")
    print(f"  {'':<10} {'wall':>7} {'sum of trials':>14} {'mean trial':>11} {'first start':>12}"
          f" {'mean gap':>9}")  # fmt: skip
    for label, (wall, trials) in (("one node", on_one), ("two nodes", on_two)):
        secs = [t.user_attrs["end"] - t.user_attrs["start"] for t in trials]
        ends = sorted(t.user_attrs["end"] for t in trials)
        starts = sorted(t.user_attrs["start"] for t in trials)
        slots = len(trials) - len([s for s in starts if s > ends[0]])  # trials at the start
        gaps = [b - a for a, b in zip(ends, starts[slots:], strict=False)]
        print(f"  {label:<10} {wall:6.0f}s {sum(secs):13.0f}s {statistics.mean(secs):10.1f}s"
              f" {starts[0]:11.1f}s {statistics.mean(gaps) if gaps else 0:8.2f}s")  # fmt: skip
    print(f"  (ray start: head {head_start:.1f} s, second node {node_start:.1f} s)")


if __name__ == "__main__":
    main()
