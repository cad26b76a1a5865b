"""A sweep checked before any Ray or MLflow work (:func:`plan`): grid, name, clean tree,
params, commit, where trials clone from, no experiment of that name yet."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bam_vae.errors import BamError
from bam_vae.sweep import git
from bam_vae.sweep.grid import Point, check_name, default_name, label, parse_grid


@dataclass
class Plan:
    """A checked sweep, before any Ray or MLflow work."""

    grid: list[str]
    points: list[Point]
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
    check_name(name)
    root = git.repo_root(cwd or Path.cwd())
    git.check_clean(root)

    from bam_vae.config import ConfigError, load_params

    for point in points:  # a bad value fails here, in one line, not in N trials
        try:
            load_params(root / "params.yaml", [f"{k}={v}" for k, v in point if ":" not in k])
        except ConfigError as exc:
            raise BamError(f"grid point {label(point)}: {exc}") from None
    commit = git.head_commit(root)
    found = subprocess.run(["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True,
                           env=_venv_env())  # fmt: skip
    result = Plan(
        grid=list(grid), points=points, name=name, root=root, commit=commit,
        source=git.clone_source(root, commit),
        cache_dir=found.stdout.strip() or str(root / ".dvc" / "cache"),
        address=address or os.environ.get("RAY_ADDRESS") or None,
        num_cpus=num_cpus, num_gpus=num_gpus,
    )  # fmt: skip
    taken = git.existing_experiments(root, result.exp_names)
    if taken:
        raise BamError(f"experiments {', '.join(taken[:3])} exist already; pick another --name")
    return result
