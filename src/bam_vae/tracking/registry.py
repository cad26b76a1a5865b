"""The model registry's writes and names, in one place: the registered generator's name
(``bam-vae-<arch>``), a new version of it (:func:`register`), a sampler added to a version
(:func:`add_sampler`), the ``champion`` alias (:func:`promote`) and the versions of a run
deleted (:func:`delete_versions_of_run`). Runs and the store are :mod:`store`'s."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bam_vae.errors import BamError
from bam_vae.files import before_commit
from bam_vae.tracking import store

SAMPLERS = "artifacts/samplers"  # in the logged model, beside the weights


def quote(value: str) -> str:
    """``value`` as a quoted string of MLflow's search grammar."""
    return "'" + value.replace("'", "\\'") + "'"


def registered_name(arch: str, dataset: str = "mnist") -> str:
    """``bam-vae-<arch>`` for MNIST (the names of the report's models), else
    ``bam-vae-<dataset>-<arch>``: one champion per dataset and architecture."""
    return f"bam-vae-{arch}" if dataset == "mnist" else f"bam-vae-{dataset}-{arch}"


def version_of_run(run_id: str, name: str) -> tuple[str, str] | None:
    """(model URI, version) of the version of registered model ``name`` that ``run_id``
    registered."""
    for found in store.client().search_model_versions(f"run_id = '{run_id}'"):
        if found.name == name:
            return found.source, str(found.version)
    return None


def register(model_uri: str, run_id: str, name: str) -> str:
    """A new version of registered model ``name`` for ``model_uri``; its number. The
    stage's commit checks run first (its params and code unchanged since it started)."""
    before_commit()
    with store.store_lock():
        for attempt in range(5):  # parallel writers on a server can race for a version number
            try:
                version = mlflow.register_model(model_uri, name)
                return str(version.version)
            except mlflow.exceptions.MlflowException:
                time.sleep(0.5 * (attempt + 1))
                found = version_of_run(run_id, name)  # registered, but the reply was lost
                if found:
                    return found[1]
    raise BamError(f"could not register {name} for run {run_id}")


def add_sampler(ref: dict[str, str], sampler_file: Path, kind: str) -> None:
    """Upload ``sampler_file`` into the registered version of the run ``ref`` names (the
    model's ``models/mlflow_run.json``) as ``samplers/<kind>.npz``, make ``kind`` its default,
    and tag and describe the version with it."""
    before_commit()
    client = store.client()
    model_id = ref["model_uri"].rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / f"{kind}.npz"
        named.write_bytes(sampler_file.read_bytes())
        (Path(tmp) / "default.json").write_text(json.dumps({"sampler": kind}))
        client.log_model_artifact(model_id, str(named), SAMPLERS)
        client.log_model_artifact(model_id, str(Path(tmp) / "default.json"), SAMPLERS)
    name, version = ref["model_name"], ref["model_version"]
    fitted = sorted({*client.get_model_version(name, version).tags.get("samplers", "").split(","),
                     kind} - {""})  # fmt: skip
    client.set_model_version_tag(name, version, "sampler", kind)
    client.set_model_version_tag(name, version, "samplers", ",".join(fitted))
    client.update_model_version(
        name, version,
        description=f"Generator of images: decoder + samplers {', '.join(['prior', *fitted])};"
        f" default sampler {kind}. POST /invocations with"
        ' {"dataframe_records": [{"n": 16, "seed": 0}]}.',
    )  # fmt: skip


def comparable_n(ns: list[float | None]) -> float | None:
    """The number of generated images most of these scores come from (ties: the larger).

    FID is biased by N (it falls as N grows), so scores from different N never share a
    ranking or a curve; ``None`` (scored before N was logged) is a group of its own."""
    counts = pd.Series([-1.0 if n is None or np.isnan(n) else float(n) for n in ns]).value_counts()
    best = max(counts.index, key=lambda n: (counts[n], n))
    return None if best == -1.0 else best


def n_label(n: float | None) -> str:
    return "unknown N" if n is None or np.isnan(n) else f"N = {int(n)}"


def promote(
    space: str = "classifier", alias: str = "champion", sampler: str = "gmm"
) -> dict[str, str]:
    """Point ``alias`` at the version with the lowest FID of ``sampler`` in ``space``, per model.

    Only versions scored from the same number of generated images are ranked together: the
    N most versions share (:func:`comparable_n`); the others are named, not ranked.

    Versions scored before samplers existed carry bare tags (``fid_classifier``): ``prior``.
    """
    from bam_vae.samplers import KINDS  # the sampler registry: only to name the choices

    if sampler not in KINDS:
        raise BamError(f"--sampler: unknown sampler {sampler!r}; expected one of {KINDS}")
    store.init()
    client = store.client()
    keys = [f"{sampler}/fid_{space}"] + ([f"fid_{space}"] if sampler == "prior" else [])
    n_keys = [f"{sampler}/n_generated"] + (["n_generated"] if sampler == "prior" else [])

    def tag(version, names: list[str]) -> float | None:
        return next((float(version.tags[k]) for k in names if k in version.tags), None)

    picks = []  # decided before any write, so a refused grant leaves every alias as it was
    for model in client.search_registered_models("name LIKE 'bam-vae-%'"):
        versions = client.search_model_versions(f"name = {quote(model.name)}")
        scored = [(tag(v, keys), int(v.version), tag(v, n_keys)) for v in versions]
        scored = [s for s in scored if s[0] is not None]
        if not scored:
            print(f"promote: {model.name} has no version scored with {keys[0]}; run compute-fid")
            continue
        n = comparable_n([s[2] for s in scored])
        ranked = [s for s in scored if s[2] == n]
        picks.append((model.name, min(ranked), len(ranked), n, [s for s in scored if s[2] != n]))
    for name, *_ in picks:
        store.require_model(name, f"promote moves @{alias}")
    chosen: dict[str, str] = {}
    for name, (fid, version, _), n_ranked, n, left in picks:
        client.set_registered_model_alias(name, alias, str(version))
        chosen[name] = str(version)
        print(
            f"promote: {name}@{alias} -> version {version} ({keys[0]} {fid:.3f}, ranked"
            f" among {n_ranked} versions scored from {n_label(n)} images)"
        )
        if left:
            skipped = ", ".join(
                f"{v} ({n_label(k)})" for _, v, k in sorted(left, key=lambda s: s[1])
            )
            print(f"promote: {name}: not ranked, scored from other numbers of images: {skipped}")
    if not chosen:
        raise BamError(
            f"no registered version has {keys[0]}; run `dvc repro` (compute-fid) with"
            f" generate.sampler={sampler} first"
        )
    return chosen


def delete_versions_of_run(run_id: str) -> None:
    """Delete every registered version that run ``run_id`` registered."""
    client = store.client()
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        client.delete_model_version(version.name, version.version)
