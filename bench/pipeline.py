"""The default pipeline end to end: each stage's wall time, start-up included.

Runs ``dvc repro`` on a fresh clone of this checkout's commit (outputs, DVC cache and MLflow
store all new, as for a new user) and times each stage from DVC's ``Running stage`` lines.
``--without-dvc`` runs each stage's ``cmd`` from ``dvc.yaml`` in file order instead (``foreach``
expanded from ``params.yaml``), for a machine that has the package but not DVC. Prints the
machine, the commit, the per-stage table and the headline metrics.

    python bench/pipeline.py [--without-dvc] [--here] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bam_vae.machine import cpu_name


def stage_commands(root: Path) -> list[tuple[str, str]]:
    """(name, cmd) of every stage in ``dvc.yaml`` order, ``foreach`` over a params list
    expanded as DVC names them (``fid-reference@classifier``)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    out = []
    for name, stage in stages.items():
        if "foreach" not in stage:
            out.append((name, stage["cmd"]))
            continue
        section, key = re.fullmatch(r"\$\{(\w+)\.(\w+)\}", stage["foreach"]).groups()
        for item in params[section][key]:
            out.append((f"{name}@{item}", stage["do"]["cmd"].replace("${item}", str(item))))
    return out


def timed_lines(cmd: list[str] | str, cwd: Path, env: dict[str, str]):
    """Yield (seconds since start, line) of the command's merged output as it comes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    for line in proc.stdout:
        yield time.perf_counter() - start, line.rstrip("\n")
    if proc.wait():
        raise SystemExit(f"{cmd} failed with exit code {proc.returncode}")


def with_dvc(root: Path, env: dict[str, str]) -> dict[str, float]:
    started: list[tuple[str, float]] = []
    end = 0.0
    for t, line in timed_lines(["dvc", "repro"], root, env):
        print(f"{t:7.1f} {line}", flush=True)
        if found := re.search(r"Running stage '([^']+)'", line):
            started.append((found.group(1), t))
        end = t
    ends = [t for _, t in started[1:]] + [end]
    return {name: e - s for (name, s), e in zip(started, ends, strict=True)}


def without_dvc(root: Path, env: dict[str, str]) -> dict[str, float]:
    seconds = {}
    for name, cmd in stage_commands(root):
        t = 0.0
        for t, line in timed_lines(cmd, root, env):
            print(f"{name:>24} {t:7.1f} {line}", flush=True)
        seconds[name] = t
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-dvc", action="store_true", help="run dvc.yaml's cmds in order")
    parser.add_argument("--here", action="store_true", help="in this checkout, not a fresh clone")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                            capture_output=True).stdout.strip() or "unknown"  # fmt: skip
    root = here if args.here else Path(tempfile.mkdtemp(prefix="bam-pipeline-")) / "clone"
    if not args.here:
        subprocess.run(["git", "clone", "-q", str(here), str(root)], check=True)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # The clone's own code, not that of the checkout the package was installed from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        seconds = (without_dvc if args.without_dvc else with_dvc)(root, env)
        total = time.perf_counter() - start
        metrics = {f: json.loads((root / "metrics" / f).read_text()) for f in
                   ("train.json", "sampler.json", "fid.json")}  # fmt: skip
    finally:
        if not (args.here or args.keep):
            shutil.rmtree(root.parent, ignore_errors=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{cpu_name()} ({os.cpu_count()} CPUs), {gpu}; torch {torch.__version__};"
          f" commit {commit}; {datetime.date.today()}")  # fmt: skip
    print(f"command: python bench/pipeline.py {' '.join(sys.argv[1:])}".rstrip())
    for name, s in seconds.items():
        print(f"  {name:28s} {s:7.1f} s")
    print(f"  {'total':28s} {total:7.1f} s ({total / 60:.1f} min)")
    train, sampler, fid = metrics["train.json"], metrics["sampler.json"], metrics["fid.json"]
    print(f"test_loss {train['test_loss']:.4f}; {sampler['sampler']} fitted in"
          f" {sampler['fit_seconds']} s; fid_classifier {fid['fid_classifier']:.2f}")  # fmt: skip
    if args.keep:
        print(f"clone kept at {root}")


if __name__ == "__main__":
    main()
