"""Fail when dvc.lock does not describe the committed code and params.

On a clean clone `dvc status` reports every output as missing ("not in cache", or "deleted" for
an output another stage depends on): that is expected. A dependency that is a source file or a
param, "modified" or "new", means a commit changed a stage's code or params without running
`dvc repro` and committing the lock it wrote: that fails here, one line per change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def produced_paths(lock: Path) -> set[str]:
    """Every output some stage writes, as dvc.lock lists them."""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {out["path"] for stage in stages.values() for out in stage.get("outs", [])}


def is_produced(dep: str, produced: set[str]) -> bool:
    """``dep`` is an output, a file inside an output folder, or a folder of outputs."""
    path = Path(dep)
    return any(path == Path(out) or Path(out) in path.parents or path in Path(out).parents
               for out in produced)  # fmt: skip


def problems(status: dict, produced: set[str]) -> list[str]:
    found = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed", ...
                found.append(f"{stage}: {change}")
                continue
            for dep, how in change.get("changed deps", {}).items():
                if isinstance(how, dict):  # a params file: {key: modified | new | deleted}
                    found += [f"{stage}: param {key} {what}" for key, what in how.items()]
                elif not (how == "deleted" and is_produced(dep, produced)):
                    found.append(f"{stage}: dependency {dep} {how}")
    return found


def main() -> int:
    done = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"dvc status failed:\n{done.stderr}", file=sys.stderr)
        return 2
    found = problems(json.loads(done.stdout or "{}"), produced_paths(Path("dvc.lock")))
    for line in found:
        print(f"dvc.lock is stale: {line}", file=sys.stderr)
    if found:
        print("run `dvc repro` and commit dvc.lock and metrics/ (README, Development)",
              file=sys.stderr)  # fmt: skip
        return 1
    print("dvc.lock matches the committed code and params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
