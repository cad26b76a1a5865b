"""What a sweep asks of its git repository: where it is, that it is clean, the commit and
where trials clone it from, the author of their commits, the experiments it has already,
its DVC cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bam_vae.errors import BamError


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


def head_commit(root: Path, required: bool = True) -> str:
    """HEAD's commit; outside a repository a BamError, or "" when not ``required``."""
    return _git(root, "rev-parse", "HEAD", check=required)


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


def experiments_named(root: Path, name: str) -> list[str]:
    """The experiments of a sweep ``name`` (``NAME-<trial>``) this repository has."""
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps/", check=False)
    pattern = re.compile(rf"^{re.escape(name)}-\d+$")
    names = [ref.rsplit("/", 1)[-1] for ref in refs.splitlines()]
    return [n for n in names if pattern.match(n)]


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``root``: this interpreter's DVC, whatever PATH holds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=env)


def cache_dir(root: Path) -> str:
    """The checkout's DVC cache, which trials on its machine share (and its run cache)."""
    return _dvc(root, "cache", "dir").stdout.strip() or str(root / ".dvc" / "cache")


def pull_experiments(root: Path, names: list[str]) -> str:
    """Fetch experiments ``names`` from ``origin`` into the checkout, so that ``dvc exp show``
    and ``dvc exp apply`` find them there: their git refs only (``--no-cache``; trials on
    this machine wrote their outputs into its cache, the others' come with ``dvc pull``).
    Returns "" or DVC's one-line reason."""
    done = _dvc(root, "exp", "pull", "--no-cache", "origin", *names)
    if not done.returncode:
        return ""
    lines = done.stderr.strip().splitlines()
    return ([x for x in lines if x.startswith("ERROR")] or lines or [f"exit {done.returncode}"])[-1]


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
