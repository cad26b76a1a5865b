"""The runs a report compares, fetched from the MLflow store once: one row per training run
and sampler it was scored with, and the per-epoch histories of the losses.

The score columns are whatever the scoring stages logged as ``<sampler>/<name>``
(compute-fid's FID/KID/precision/recall, inspect's memorisation, ...): no second list of
names to keep in step with them. Read as logged before the current names (kept so that an
existing store still reads): runs scored before samplers existed logged bare names
(``fid_classifier``: the prior's), runs scored before other datasets ``digit_entropy`` for
``class_entropy`` and had no ``dataset`` tag (MNIST).
"""

from __future__ import annotations

from typing import get_args

import mlflow
import numpy as np
import pandas as pd

from bam_vae.config import FeatureSpace
from bam_vae.errors import BamError, reason
from bam_vae.samplers import KINDS
from bam_vae.tracking import store as tracking
from bam_vae.tracking.registry import comparable_n, n_label, quote

SPACES = get_args(FeatureSpace)
# Columns of the table: (name in the report, column of mlflow.search_runs).
COLUMNS = {
    "run_id": "run_id",
    "dvc_exp_name": "tags.dvc_exp_name",
    "sweep": "tags.sweep",
    "model_version": "tags.registered_model_version",
    "dataset": "tags.dataset",
    "arch": "params.model.arch",
    "z_dim": "params.model.z_dim",
    "k1": "params.train.k1",
    "k2": "params.train.k2",
    "epochs": "params.train.epochs",
    "train_fraction": "params.train.train_fraction",
    "status": "status",
    "recon": "params.train.recon",
    "train_loss": "metrics.train_loss",
    "test_loss": "metrics.test_loss",
}
NUMERIC = ["z_dim", "k1", "k2", "epochs", "train_fraction"]
# The score columns the report reads: present (maybe all NaN) whatever the runs logged.
DRAWN = [
    *(f"{m}_{s}" for s in SPACES for m in ("fid", "fid_floor", "precision", "recall")),
    "n_generated",
]
HISTORIES = ("train_loss", "test_loss")  # per epoch, for the loss curves (Figure 2)
RENAMED = {"digit_entropy": "class_entropy"}  # old name -> the name it is read as


def search_filter(sweep: str | None, exp_names: list[str] | None, query: str | None) -> str:
    # Report runs have no model params and are dropped after the search (a "!=" filter on a
    # tag would also drop every run that lacks the tag).
    clauses = []
    if sweep:
        clauses.append(f"tags.sweep = {quote(sweep)}")
    if exp_names:
        clauses.append(f"tags.dvc_exp_name IN ({', '.join(quote(n) for n in exp_names)})")
    if query:
        clauses.append(f"({query})" if " or " in query.lower() else query)
    return " AND ".join(clauses)


def score_names(runs: pd.DataFrame) -> list[str]:
    """The names logged as ``<sampler>/<name>`` by any selected run, the drawn ones first."""
    logged = {c.split("/", 1)[1] for c in runs.columns if c.startswith("metrics.") and "/" in c}
    logged = {RENAMED.get(name, name) for name in logged}
    return [*DRAWN, *sorted(logged - set(DRAWN))]


def collect(
    sweep: str | None = None, exp_names: list[str] | None = None, query: str | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per selected training run and sampler it was scored with (a run scored by
    none keeps one bare row), with the report's columns and every score logged (missing
    ones NaN); with ``dataset``, only that dataset's runs. Raises BamError for a bad query."""
    tracking.init()
    try:
        runs = mlflow.search_runs(
            experiment_names=[tracking.EXPERIMENT],
            filter_string=search_filter(sweep, exp_names, query),
            output_format="pandas",
        )
    except mlflow.exceptions.MlflowException as exc:
        raise BamError(f"bad run query {query!r}: {reason(exc)}") from None
    if "params.model.arch" in runs:
        runs = runs[runs["params.model.arch"].notna()]  # training runs only, not reports
    scores = score_names(runs)
    empty = pd.DataFrame(columns=[*COLUMNS, "sampler", *scores])
    if runs.empty:
        return empty
    base = pd.DataFrame({name: runs.get(col, np.nan) for name, col in COLUMNS.items()})
    # runs from before other datasets (no column at all: float NaN, which "mnist" cannot fill)
    base["dataset"] = base["dataset"].astype(object).fillna("mnist")
    if dataset:
        base = base[base["dataset"] == dataset]
    if base.empty:
        return empty
    runs = runs.loc[base.index]
    table = pd.concat([_scored(base, runs, sampler, scores) for sampler in KINDS] + [base.assign(
        sampler=np.nan, **dict.fromkeys(scores, np.nan))], ignore_index=True)  # fmt: skip
    scored = table["sampler"].notna()
    table = table[scored | ~table["run_id"].isin(table.loc[scored, "run_id"])]
    for col in NUMERIC:
        table[col] = pd.to_numeric(table[col], errors="coerce")
    order = ["dataset", "arch", "z_dim", "k1", "epochs", "train_fraction", "sampler"]
    return table.sort_values(order).reset_index(drop=True)


def _scored(base: pd.DataFrame, runs: pd.DataFrame, sampler: str, names: list[str]):
    """The rows of ``runs`` scored with ``sampler``, its scores as plain columns."""

    def logged(name: str) -> pd.Series:
        values = runs.get(f"metrics.{sampler}/{name}", pd.Series(np.nan, index=runs.index))
        if sampler == "prior" and f"metrics.{name}" in runs:
            values = values.fillna(runs[f"metrics.{name}"])
        return values

    def column(name: str) -> pd.Series:
        values = logged(name)
        for old in (old for old, new in RENAMED.items() if new == name):
            values = values.fillna(logged(old))
        return values

    scores = pd.DataFrame({name: column(name) for name in names})
    keep = scores.notna().any(axis=1)
    return base[keep].assign(sampler=sampler, **{k: v[keep] for k, v in scores.items()})


def histories(run_ids: list[str], metrics: tuple[str, ...] = HISTORIES) -> pd.DataFrame:
    """Columns run_id, metric, step, value: every logged value of ``metrics`` of each run
    (one store call per run and metric, made here, not while drawing)."""
    client = tracking.client()
    rows = [
        (run_id, metric, m.step, m.value)
        for run_id in dict.fromkeys(run_ids)
        for metric in metrics
        for m in client.get_metric_history(run_id, metric)
    ]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])


def same_n(table: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows whose scores may be drawn together, and a note on the scored rows left out."""
    scored = table[[f"fid_{s}" for s in SPACES]].notna().any(axis=1)
    if not scored.any():
        return table, None
    n = comparable_n(table.loc[scored, "n_generated"].tolist())
    same = table["n_generated"].isna() if n is None else table["n_generated"] == n
    left = table[scored & ~same]
    if left.empty:
        return table, None
    others = ", ".join(
        f"{n_label(k)} ({len(g)} rows)" for k, g in left.groupby("n_generated", dropna=False)
    )
    note = (
        f"FID figures use the scores from {n_label(n)} images; {len(left)} rows scored from"
        f" other numbers of images are in the table only: {others}"
    )
    return table[~scored | same], note
