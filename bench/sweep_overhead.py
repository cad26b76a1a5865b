"""What the Ray path of ``bam sweep`` costs: per trial (clone, pull, push around the pipeline)
and per sweep (scheduling), on a tiny project on this machine.

1. The same tiny trial twice: ``dvc exp run`` alone in a checkout, then as a one-point
   ``bam sweep`` on a one-node cluster; the trial's own timings split clone, DVC remote
   check and pull, the pipeline, and the pushes (DVC remote, ``dvc exp push origin``).
2. ``--points`` tiny points (8) on one node, then on two nodes (another ``ray start`` on this
   machine). Nodes here share the same cores, so this shows what scheduling costs, not a
   speed-up: the wait before the first trial starts, and the gap between one trial ending
   on a node and the next starting there.

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


def sweep(root: Path, grid: list[str], name: str, cluster: Cluster):
    """``run_sweep`` in this process, as ``bam sweep`` would, against ``cluster``."""
    from bam_vae.sweep.driver import run_sweep

    saved = dict(os.environ)
    os.environ.update(cluster.env)
    try:
        result = run_sweep(grid, address=cluster.address, name=name, cwd=root)
        if result.failed:
            sys.exit(f"sweep {name}: {len(result.failed)} points failed; see {result.logs}")
        return result
    finally:
        os.environ.clear()
        os.environ.update(saved)


def scheduling(result, wall_start: float) -> tuple[float, float]:
    """(seconds from the sweep's first line to the first trial start, mean gap between a
    trial ending on a node and the next one starting on it)."""
    trials = sorted(result.results, key=lambda r: r["started"])
    first = trials[0]["started"] - wall_start
    gaps = []
    for node in {r["node_id"] for r in trials}:
        on_node = [r for r in trials if r["node_id"] == node]
        gaps += [b["started"] - a["finished"] for a, b in zip(on_node, on_node[1:], strict=False)]
    return first, statistics.mean(gaps) if gaps else float("nan")


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
        alone = sh(["dvc", "exp", "run", "-S", "model.z_dim=2", "-S", "train.sweep=alone"], plain)
        cluster = Cluster()
        try:
            head_start = cluster.start_node()
            wall = time.time()
            one = sweep(root, ["model.z_dim=2"], "one", cluster)
            trial = one.results[0]
            phases = trial["phases"]
            ray_side = trial["started"] - wall  # connect, parent run, scheduling, worker start

            # 2. N points on one node, then on two.
            grid = [f"model.z_dim={','.join(str(z) for z in range(1, args.points + 1))}"]
            wall1 = time.time()
            on_one = sweep(root, grid, "one-node", cluster)
            node_start = cluster.start_node()
            wall2 = time.time()
            on_two = sweep(root, grid, "two-nodes", cluster)
        finally:
            cluster.stop()

    print("\n1. one tiny trial (z = 2): the pipeline alone vs through Ray")
    rows = [
        ("dvc exp run alone (no Ray, a checkout sharing the cache)", alone),
        ("through Ray: git clone + checkout + dvc cache dir", phases.get("clone", 0)),
        ("through Ray: dvc remote default + dvc pull --run-cache",
         phases.get("remote", 0) + phases.get("pull", 0)),
        ("through Ray: the pipeline (dvc exp run)", phases.get("pipeline", 0)),
        ("through Ray: dvc push --run-cache + dvc exp push origin", phases.get("push", 0)),
        ("through Ray: the whole trial", trial["seconds"]),
        ("sweep start to trial start (ray.init, parent run, worker)", ray_side),
        ("one-point sweep, first progress line to final table", one.wall_seconds),
    ]  # fmt: skip
    for what, secs in rows:
        print(f"  {what:<62} {secs:6.1f} s")
    overhead = trial["seconds"] - phases.get("pipeline", 0)
    print(f"  per-trial overhead of the Ray path: {overhead:.1f} s"
          f" ({100 * overhead / phases.get('pipeline', 1):.0f} % of the pipeline)")  # fmt: skip

    print(f"\n2. {args.points} tiny points (ray start nodes of 1 CPU on this 2-core machine)")
    print(f"  {'':<10} {'wall':>7} {'sum of trials':>14} {'mean trial':>11} {'first start':>12}"
          f" {'gap on a node':>14}")  # fmt: skip
    for label, result, start in (("one node", on_one, wall1), ("two nodes", on_two, wall2)):
        secs = [r["seconds"] for r in result.results]
        first, gap = scheduling(result, start)
        print(f"  {label:<10} {result.wall_seconds:6.0f}s {sum(secs):13.0f}s"
              f" {statistics.mean(secs):10.1f}s {first:11.1f}s {gap:13.2f}s")  # fmt: skip
    print(f"  (ray start: head {head_start:.1f} s, second node {node_start:.1f} s)")


if __name__ == "__main__":
    main()
