"""``bam report`` / ``bam promote``: compare runs straight from the MLflow store.

The report selects training runs (by sweep tag, DVC experiment names and/or an MLflow search
filter), writes ``reports/runs.csv`` and ``reports/runs.md`` and redraws the report's figures
from whatever those runs contain: 6a (FID vs z_dim per arch, log-x), 6b (FID vs the k1 share),
5 (final train/test loss vs z_dim) and 2 (loss per epoch, one curve per value of the swept
param), and precision against recall per feature space. A figure that the selected runs
cannot support is listed as missing, with the reason.
Runs of different datasets (tag ``dataset``; runs logged before it existed are MNIST's) are
never on one curve: every curve is one dataset's, and ``--dataset`` keeps one dataset only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bam_vae import paths
from bam_vae.errors import BamError, reason
from bam_vae.figures import colormap, save_figure, subplots
from bam_vae.files import staged_outputs
from bam_vae.samplers import KINDS
from bam_vae.tracking import store as tracking
from bam_vae.tracking.registry import comparable_n, n_label, quote

SPACES = ("classifier", "inception")
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
# Scores of one sampler, logged by compute-fid as ``<sampler>/<name>``.
SCORES = [
    *(f"{m}_{s}" for s in SPACES for m in ("fid", "fid_recon", "fid_floor", "kid")),
    *(f"{m}_{s}" for s in SPACES for m in ("precision", "recall", "density", "coverage")),
    *(f"{m}_recon_{s}" for s in SPACES for m in ("precision", "recall")),
    "class_entropy", "confident_share", "label_accuracy", "n_generated",
    "copy_share", "nn_ratio", "mw_z",  # stage inspect: memorisation
]  # fmt: skip
NUMERIC = ["z_dim", "k1", "k2", "epochs", "train_fraction"]
# The params a sweep can vary, in the order used to group the loss curves of Figure 2.
SWEPT = ["train_fraction", "epochs", "z_dim", "k1", "arch"]


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


def collect(
    sweep: str | None = None, exp_names: list[str] | None = None, query: str | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per selected training run, with the report's columns (missing ones as NaN);
    with ``dataset``, only that dataset's runs."""
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
    if runs.empty:
        return pd.DataFrame(columns=[*COLUMNS, "sampler", *SCORES])
    base = pd.DataFrame({name: runs.get(col, np.nan) for name, col in COLUMNS.items()})
    base["dataset"] = base["dataset"].fillna("mnist")  # runs from before other datasets
    if dataset:
        base = base[base["dataset"] == dataset]
    if base.empty:
        return pd.DataFrame(columns=[*COLUMNS, "sampler", *SCORES])
    runs = runs.loc[base.index]
    table = pd.concat([_scored(base, runs, sampler) for sampler in KINDS] + [base.assign(
        sampler=np.nan, **dict.fromkeys(SCORES, np.nan))], ignore_index=True)  # fmt: skip
    # One row per (run, sampler scored); a run scored by no sampler keeps its bare row.
    scored = table["sampler"].notna()
    table = table[scored | ~table["run_id"].isin(table.loc[scored, "run_id"])]
    for col in NUMERIC:
        table[col] = pd.to_numeric(table[col], errors="coerce")
    order = ["dataset", "arch", "z_dim", "k1", "epochs", "train_fraction", "sampler"]
    return table.sort_values(order).reset_index(drop=True)


def _scored(base: pd.DataFrame, runs: pd.DataFrame, sampler: str) -> pd.DataFrame:
    """The rows of ``runs`` scored with ``sampler``, its scores as plain columns.

    Runs scored before samplers existed logged bare names (``fid_classifier``): z ~ N(0, I);
    runs scored before other datasets logged ``digit_entropy`` for ``class_entropy``.
    """

    def logged(name: str) -> pd.Series:
        values = runs.get(f"metrics.{sampler}/{name}", pd.Series(np.nan, index=runs.index))
        if sampler == "prior" and f"metrics.{name}" in runs:
            values = values.fillna(runs[f"metrics.{name}"])
        return values

    def column(name: str) -> pd.Series:
        values = logged(name)
        return values.fillna(logged("digit_entropy")) if name == "class_entropy" else values

    scores = pd.DataFrame({name: column(name) for name in SCORES})
    keep = scores.notna().any(axis=1)
    return base[keep].assign(sampler=sampler, **{k: v[keep] for k, v in scores.items()})


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


# ---------------------------------------------------------------------------- figures
def _fid_spaces(table: pd.DataFrame) -> list[str]:
    return [s for s in SPACES if table[f"fid_{s}"].notna().any()]


def fig_fid_vs(table: pd.DataFrame, x: str, path: Path, title: str, logx: bool) -> str | None:
    spaces = _fid_spaces(table)
    if not spaces or table[x].nunique() < 2:
        return f"needs runs with FID and at least two values of {x} (have {table[x].nunique()})"
    fig, axes = subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        scored = table.dropna(subset=[f"fid_{space}"])
        several = scored["dataset"].nunique() > 1
        for (dataset, arch, sampler), group in scored.groupby(["dataset", "arch", "sampler"]):
            g = group.groupby(x)[[f"fid_{space}", f"fid_floor_{space}"]].mean().sort_index()
            name = f"{dataset} {arch}" if several else arch
            ax.plot(g.index, g[f"fid_{space}"], marker="o", label=f"{name}, {sampler}")
        for dataset, group in table.groupby("dataset"):  # each dataset has its own floor
            floor = group[f"fid_floor_{space}"].mean()
            if not np.isnan(floor):
                what = f"{dataset} floor" if several else "floor"
                ax.axhline(floor, color="grey", ls="--", label=f"{what} (real vs real)")
        ax.set(xlabel=x, ylabel=f"FID ({space} features)", title=title, yscale="log")
        if logx:
            ax.set_xscale("log", base=2)
        ax.legend()
    save_figure(fig, path)
    return None


def fig_precision_recall(table: pd.DataFrame, path: Path) -> str | None:
    """Precision against recall (Kynkäänniemi et al. 2019), one point per run and sampler,
    one panel per feature space: up and right is better; the corner is the test set's."""
    spaces = [
        s for s in SPACES if f"precision_{s}" in table and table[f"precision_{s}"].notna().any()
    ]
    if not spaces:
        return "needs runs scored by compute-fid with precision/recall (run it again)"
    fig, axes = subplots(1, len(spaces), figsize=(5 * len(spaces), 4.5), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        scored = table.dropna(subset=[f"precision_{space}"])
        for (arch, sampler), g in scored.groupby(["arch", "sampler"], dropna=False):
            ax.scatter(g[f"recall_{space}"], g[f"precision_{space}"], label=f"{arch} {sampler}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall (test images covered)",
               ylabel="precision (samples on the test manifold)", title=space)  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle("Improved precision and recall, k = 3")
    save_figure(fig, path)
    return None


def fig_loss_vs_zdim(table: pd.DataFrame, path: Path) -> str | None:
    if table["z_dim"].nunique() < 2 or table["test_loss"].isna().all():
        return (
            f"needs finished runs with at least two z_dim values (have {table['z_dim'].nunique()})"
        )
    fig, ax = subplots(figsize=(6, 4))
    runs = table.drop_duplicates("run_id")
    several = runs["dataset"].nunique() > 1
    for (dataset, arch), group in runs.groupby(["dataset", "arch"]):
        g = group.groupby("z_dim")[["train_loss", "test_loss"]].mean().sort_index()
        name = f"{dataset} {arch}" if several else arch
        ax.plot(g.index, g["train_loss"], marker="o", label=f"{name} train")
        ax.plot(g.index, g["test_loss"], marker="s", ls="--", label=f"{name} test")
    ax.set(
        xlabel="z_dim", ylabel="final loss", title="Final train/test loss vs latent size (Fig. 5)"
    )
    ax.set_xscale("log", base=2)
    ax.legend()
    save_figure(fig, path)
    return None


def fig_curves(table: pd.DataFrame, path: Path) -> str | None:
    varying = [p for p in SWEPT if table[p].nunique() > 1]
    if table.empty:
        return "no runs selected"
    group = varying[0] if varying else "arch"
    client = tracking.client()
    table = table.drop_duplicates("run_id")  # a row per sampler; one curve per run
    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = colormap("viridis")
    values = sorted(table[group].dropna().unique())
    for _, row in table.iterrows():
        shade = colours(values.index(row[group]) / max(1, len(values) - 1))
        for ax, metric in zip(axes, ("train_loss", "test_loss"), strict=True):
            hist = client.get_metric_history(row["run_id"], metric)
            if hist:
                steps = sorted(hist, key=lambda m: m.step)
                ax.plot([m.step for m in steps], [m.value for m in steps], color=shade,
                        label=f"{group}={row[group]}")  # fmt: skip
    for ax, metric in zip(axes, ("train loss", "test loss"), strict=True):
        ax.set(xlabel="epoch", title=f"{metric} per epoch, by {group} (Fig. 2)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    save_figure(fig, path)
    return None


# ---------------------------------------------------------------------------- report
def _count(table: pd.DataFrame) -> str:
    return f"{table['run_id'].nunique()} runs, {len(table)} rows (one per run and sampler)"


def _markdown(
    table: pd.DataFrame, missing: dict[str, str], selection: str, note: str | None
) -> str:
    shown = table.dropna(axis=1, how="all")
    lines = [f"# bam-vae runs\n\nSelection: `{selection or 'all training runs'}` "
             f"({_count(table)})\n"]  # fmt: skip
    if len(shown):
        cols = list(shown.columns)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for _, row in shown.iterrows():
            cells = [
                f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row
            ]
            lines.append("| " + " | ".join(c.replace("nan", "") for c in cells) + " |")
    if note:
        lines.append(f"\n## Scores from different numbers of images\n\n{note}")
    if missing:
        lines.append("\n## Missing\n")
        lines += [f"- {name}: {why}" for name, why in missing.items()]
    return "\n".join(lines) + "\n"


def _study(sweep: str, drawn: Path) -> str:
    """A ``bam sweep`` study's parent run, if ``sweep`` is one: its figures (Optuna's) into
    ``drawn/study/`` and its trial table as a Markdown section."""
    runs = tracking.client().search_runs(
        [tracking.init()], f"tags.sweep = {quote(sweep)} and tags.bam_kind = 'sweep'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    if not runs:
        return ""
    run = runs[0]
    try:
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="study",
                                            dst_path=str(drawn))  # fmt: skip
    except mlflow.exceptions.MlflowException:
        return ""  # a grid of an older bam sweep: no study
    trials = drawn / "study" / "trials.txt"
    best = {k.removeprefix("best."): v for k, v in run.data.tags.items() if k.startswith("best.")}
    lines = [f"\n## Study {sweep}\n", f"Parent run {run.info.run_id}, storage"
             f" {run.data.tags.get('optuna_storage', '?')}, metric {run.data.tags.get('metric')}"
             f" ({run.data.tags.get('direction')}); figures in study/."]  # fmt: skip
    if "best_trial" in run.data.tags:
        lines.append(f"Best trial {run.data.tags['best_trial']}: "
                     + " ".join(f"{k}={v}" for k, v in best.items()))  # fmt: skip
    if trials.is_file():
        lines += ["", "```", trials.read_text().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def report(
    sweep: str | None = None,
    exp_names: list[str] | None = None,
    query: str | None = None,
    out_dir: Path = paths.REPORTS,
    dataset: str | None = None,
) -> dict[str, str]:
    table = collect(sweep, exp_names, query, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing: dict[str, str] = {}
    comparable, note = same_n(table)
    shares = comparable.assign(k1_share=comparable.k1 / (comparable.k1 + comparable.k2))
    figures = {
        "fig6a_fid_vs_zdim.png": lambda p: fig_fid_vs(
            comparable, "z_dim", p, "FID vs latent size (Fig. 6a)", logx=True
        ),
        "fig6b_fid_vs_k1.png": lambda p: fig_fid_vs(
            shares, "k1_share", p, "FID vs k1 / (k1 + k2) (Fig. 6b)", logx=False
        ),
        "fig5_loss_vs_zdim.png": lambda p: fig_loss_vs_zdim(table, p),
        "precision_recall.png": lambda p: fig_precision_recall(comparable, p),
        "fig2_loss_curves.png": lambda p: fig_curves(table, p),
    }
    selection = search_filter(sweep, exp_names, query)
    if dataset:
        selection = f"{selection} AND dataset = {dataset}" if selection else f"dataset = {dataset}"
    # Drawn aside and logged first; then all files replace the earlier report's together.
    with tempfile.TemporaryDirectory() as tmp, staged_outputs() as staged:
        drawn = Path(tmp)
        for name, draw in figures.items():
            why = draw(drawn / name) if len(table) else "no runs selected"
            if why:
                missing[name] = why
                staged.remove(out_dir / name)  # never leave a figure of an earlier selection
        table.to_csv(drawn / "runs.csv", index=False)
        study = _study(sweep, drawn) if sweep else ""
        (drawn / "runs.md").write_text(_markdown(table, missing, selection, note) + study)
        tags = {"bam_kind": "report", "selection": selection}
        with mlflow.start_run(run_name="report", tags=tags):
            mlflow.log_artifacts(str(drawn), "report")
        for path in drawn.rglob("*"):
            if path.is_file():
                shutil.copyfile(path, staged.path(out_dir / path.relative_to(drawn)))
    print(f"report: {_count(table)} -> {out_dir}/runs.md, runs.csv")
    if note:
        print(f"report: {note}")
    for name, why in missing.items():
        print(f"report: {name} missing: {why}")
    return missing
