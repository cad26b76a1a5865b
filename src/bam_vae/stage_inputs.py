"""What a stage read when it started, checked again before it writes (dvc#11058).

DVC hashes a stage's params and deps when its command *ends*; a ``params.yaml`` or source
file edited while the stage runs would be recorded in ``dvc.lock`` beside outputs made from
the old one, and ``dvc status`` would then call them up to date. So ``bam <stage>`` takes a
:class:`Snapshot` of its ``dvc.yaml`` entry's params (their values) and code deps (their
SHA-256) when it starts, and :meth:`Snapshot.check` runs before any output is moved into
place or any model version is registered (:func:`bam_vae.files.commit_check`): a change is
one line naming the key (old -> new) or the file, and the stage fails without writing, so DVC
writes no lock for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bam_vae.config import load_yaml
from bam_vae.errors import BamError
from bam_vae.files import file_sha256

CODE = ("src/",)  # deps that are the stage's code (data deps are DVC's own outputs)


@dataclass
class Snapshot:
    command: str
    params_file: Path
    keys: list[str]
    code: list[Path]
    values: dict[str, Any] = field(default_factory=dict)
    digests: dict[Path, str] = field(default_factory=dict)

    def take(self) -> Snapshot:
        self.values, self.digests = self._params(), {p: _digest(p) for p in self._files()}
        return self

    def _params(self) -> dict[str, Any]:
        try:
            loaded = load_yaml(self.params_file.read_text()) or {}
        except (OSError, ValueError):
            loaded = {}
        return {key: _lookup(loaded, key) for key in self.keys}

    def _files(self) -> list[Path]:
        files = []
        for dep in self.code:
            files += sorted(p for p in dep.rglob("*") if p.is_file()) if dep.is_dir() else [dep]
        return [p for p in files if "__pycache__" not in p.parts]

    def check(self) -> None:
        """Raise :class:`BamError` naming the first param or code file that changed."""
        for key, value in self._params().items():
            if value != self.values[key]:
                where, was, now = _difference(key, self.values[key], value)
                raise BamError(
                    f"{self.command}: {where} changed in {self.params_file} while it ran"
                    f" ({_text(was)} -> {_text(now)}); nothing was written or registered --"
                    " run it again"
                )
        now = {p: _digest(p) for p in self._files()}
        for path in sorted(set(now) | set(self.digests)):
            if now.get(path) != self.digests.get(path):
                raise BamError(
                    f"{self.command}: {path} changed while it ran; nothing was written or"
                    " registered -- run it again"
                )


def snapshot(command: str, params_file: Path, dvc_yaml: Path = Path("dvc.yaml")) -> Snapshot | None:
    """The snapshot of ``bam <command>``'s dvc.yaml entry (matched by its ``cmd``), taken
    now; None outside a pipeline (no dvc.yaml, or no stage runs that command)."""
    try:
        stages = (load_yaml(dvc_yaml.read_text()) or {}).get("stages", {})
    except (OSError, ValueError):
        return None
    keys: list[str] = []
    code: set[Path] = set()
    for entry in stages.values():
        body = entry.get("do", entry) if isinstance(entry, dict) else {}
        words = str(body.get("cmd", "")).split()
        if words[:2] != ["bam", command]:
            continue
        for item in body.get("params", []):
            keys += [item] if isinstance(item, str) else [k for v in item.values() for k in v]
        code |= {Path(d) for d in body.get("deps", []) if str(d).startswith(CODE)}
    if not keys and not code:
        return None
    return Snapshot(command, params_file, sorted(set(keys)), sorted(code)).take()


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The first dotted key below ``key`` whose value differs, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*old, *(k for k in new if k not in old)]:
            if old.get(name) != new.get(name):
                return _difference(f"{key}.{name}", old.get(name), new.get(name))
    return key, old, new


def _digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return "missing"


def _text(value: Any) -> str:
    return "absent" if value is None else repr(value)
