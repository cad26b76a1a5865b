"""A full disk, a quota or a read-only mount while a stage writes: one line naming the path
and the cause, never a traceback; earlier outputs byte-identical, no temporary files, the run
FAILED and nothing registered. A real small tmpfs where mounting works (root), else skipped;
a patched writer everywhere."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bam_vae.cli import app
from bam_vae.tracking import store as tracking

TINY = {
    "model": {"arch": "cnn", "z_dim": 4, "channels": [8, 16]},
    "train": {"epochs": 1, "batch_size": 64, "threads": 1},
}


@pytest.fixture
def tiny_project(project, tiny_mnist):
    params = {"data": {"out_dir": str(tiny_mnist)}, **TINY}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); the patched test covers it"
        )


@pytest.fixture
def mounts():
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Take every byte left on ``folder``'s filesystem."""
    with (folder / "filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "filler"}  # fmt: skip


def bam_train(project: Path, *args: str):
    return CliRunner().invoke(app, ["train", "--params", str(project / "params.yaml"), *args])


def runs_and_versions() -> tuple[list[str], int]:
    tracking.init()
    runs = tracking.client().search_runs([tracking.init()])
    versions = tracking.client().search_model_versions("name = 'bam-vae-cnn'")
    return [r.info.status for r in runs], len(versions)


def one_line(result, path: str, cause: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    last = lines[0]
    assert last.startswith("error: cannot write ") and path in last and cause in last, last
    return last


@pytest.mark.slow
def test_a_full_checkpoint_folder_is_one_line_and_registers_nothing(
    tiny_project, mounts, monkeypatch
):
    monkeypatch.setenv("BAM_CHECKPOINT_SECONDS", "0")  # a checkpoint after the first batch
    # Room for the lock file, not for a checkpoint (weights and Adam's moments: ~0.4 MB).
    checkpoints = mounts(tiny_project / ".cache" / "checkpoints", "64k")
    result = bam_train(tiny_project)
    one_line(result, ".cache/checkpoints/train-", "no space left on the device (ENOSPC)")
    assert list(checkpoints.iterdir()) == []  # no temporary file left behind
    statuses, versions = runs_and_versions()
    assert statuses == ["FAILED"] and versions == 0
    assert not (tiny_project / "models" / "vae.pt").exists()


@pytest.mark.slow
def test_a_full_models_folder_keeps_the_earlier_outputs(tiny_project, mounts):
    assert bam_train(tiny_project).exit_code == 0
    models = tiny_project / "models"
    kept = {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()}
    before = digests(models)
    mounts(models, "1m")  # a fresh, small filesystem over models/, with the same files
    for name, blob in kept.items():
        (models / name).write_bytes(blob)
    fill(models)
    result = bam_train(tiny_project, "--set", "train.epochs=2")
    one_line(result, "models/", "no space left on the device (ENOSPC)")
    assert digests(models) == before
    assert sorted(p.name for p in models.iterdir()) == sorted([*kept, "filler"])
    statuses, versions = runs_and_versions()
    assert sorted(statuses) == ["FAILED", "FINISHED"] and versions == 1


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.EDQUOT, "disk quota exceeded (EDQUOT)"), (errno.EROFS, "read-only filesystem (EROFS)")],
)
@pytest.mark.slow
def test_a_quota_or_a_read_only_mount_is_one_line(tiny_project, monkeypatch, code, cause):
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.parent.parent.name == "models":  # models/.staging-*/vae.pt
            raise OSError(code, os.strerror(code))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    result = bam_train(tiny_project)
    one_line(result, "vae.pt", cause)
    assert not (tiny_project / "models" / "vae.pt").exists()
    assert not list((tiny_project / "models").glob(".staging-*"))
    statuses, versions = runs_and_versions()
    assert statuses == ["FAILED"] and versions == 0


@pytest.mark.slow
def test_a_full_artifact_store_is_one_line_and_registers_nothing(tiny_project, mounts):
    # The MLflow store's artifacts (mlruns/artifacts) on a filesystem with no room left.
    fill(mounts(tiny_project / "mlruns" / "artifacts", "64k"))
    result = bam_train(tiny_project)
    one_line(result, "the MLflow store's artifacts", "no space left on the device (ENOSPC)")
    statuses, versions = runs_and_versions()
    assert statuses == ["FAILED"] and versions == 0
    assert not (tiny_project / "models" / "vae.pt").exists()
