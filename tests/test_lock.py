"""CI's lock check: dvc.lock must come from the committed code and params."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, env_with_venv

CHECK = REPO / ".ci" / "check_lock.py"


@pytest.fixture
def clone(tmp_path):
    """The checkout's tracked files (with its dvc.lock, without any output), as a clone has."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    for name in files.stdout.split():
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def check(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK)], cwd=root, env=env_with_venv(),
                          capture_output=True, text=True)  # fmt: skip


def test_the_committed_lock_matches_the_committed_code(clone):
    done = check(clone)
    assert done.returncode == 0, done.stderr
    assert "dvc.lock matches the committed code and params" in done.stdout


def test_a_param_or_code_change_without_repro_fails_naming_it(clone):
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"]["epochs"] += 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with (clone / "src/bam_vae/stages/tsne.py").open("a") as fh:
        fh.write("\n# a change\n")
    done = check(clone)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert "dvc.lock is stale: train: param train modified" in lines  # DVC names the section
    assert "dvc.lock is stale: tsne: dependency src/bam_vae/stages/tsne.py modified" in lines
    assert not any("deleted" in line for line in lines)  # missing outputs are expected


def test_every_fid_key_that_moves_the_reference_features_reruns_fid_reference(clone):
    """Samples and reference must be scored by the same network: `-S fid.precision=bf16`
    (or another padding, floor or seed) makes fid-reference stale, not compute-fid alone."""
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["fid"] |= {"precision": "bf16", "pad_to": 32, "floor_n": 500, "seed": 1}
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lines = check(clone).stderr.splitlines()
    for key in ("precision", "pad_to", "floor_n", "seed"):
        assert f"dvc.lock is stale: fid-reference@classifier: param fid.{key} modified" in lines
    assert "dvc.lock is stale: compute-fid: param fid modified" in lines
