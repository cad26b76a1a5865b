"""``bam report``: compare runs straight from the MLflow store.

The report selects training runs (by sweep tag, DVC experiment names and/or an MLflow search
filter), fetches them once (:mod:`~bam_vae.reporting.table`), writes ``reports/runs.csv`` and
``reports/runs.md`` and redraws the report's figures (:mod:`~bam_vae.reporting.figures`) from
whatever those runs contain. A figure that the selected runs cannot support is listed as
missing, with the reason; a ``bam sweep`` study's trials and Optuna's figures are added.
Runs of different datasets (tag ``dataset``; runs logged before it existed are MNIST's) are
never on one curve: every curve is one dataset's, and ``--dataset`` keeps one dataset only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from bam_vae import paths
from bam_vae.files import staged_outputs
from bam_vae.reporting import figures
from bam_vae.reporting.table import collect, histories, same_n, search_filter
from bam_vae.tracking import store as tracking
from bam_vae.tracking.registry import quote


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
    history = histories(table["run_id"].tolist())
    drawers = {
        "fig6a_fid_vs_zdim.png": lambda p: figures.fid_vs(
            comparable, "z_dim", p, "FID vs latent size (Fig. 6a)", logx=True
        ),
        "fig6b_fid_vs_k1.png": lambda p: figures.fid_vs(
            shares, "k1_share", p, "FID vs k1 / (k1 + k2) (Fig. 6b)", logx=False
        ),
        "fig5_loss_vs_zdim.png": lambda p: figures.loss_vs_zdim(table, p),
        "precision_recall.png": lambda p: figures.precision_recall(comparable, p),
        "fig2_loss_curves.png": lambda p: figures.loss_curves(table, history, p),
    }
    selection = search_filter(sweep, exp_names, query)
    if dataset:
        selection = f"{selection} AND dataset = {dataset}" if selection else f"dataset = {dataset}"
    # Drawn aside and logged first; then all files replace the earlier report's together.
    with tempfile.TemporaryDirectory() as tmp, staged_outputs() as staged:
        drawn = Path(tmp)
        for name, draw in drawers.items():
            why = draw(drawn / name) if len(table) else "no runs selected"
            if why:
                missing[name] = why
                staged.remove(out_dir / name)  # never leave a figure of an earlier selection
        table.to_csv(drawn / "runs.csv", index=False)
        study = _study(sweep, drawn) if sweep else ""
        (drawn / "runs.md").write_text(_markdown(table, missing, selection, note) + study)
        tags = {"bam_kind": "report", "selection": selection}
        experiment = tracking.init()
        if tracking.can_write(experiment):
            with mlflow.start_run(run_name="report", tags=tags):
                mlflow.log_artifacts(str(drawn), "report")
        else:  # a member who may read the runs gets the report, kept on their disk only
            print(f"report: not logged to MLflow: {tracking.user()} may only read experiment"
                  f" {tracking.EXPERIMENT!r}")  # fmt: skip
        for path in drawn.rglob("*"):
            if path.is_file():
                shutil.copyfile(path, staged.path(out_dir / path.relative_to(drawn)))
    print(f"report: {_count(table)} -> {out_dir}/runs.md, runs.csv")
    if note:
        print(f"report: {note}")
    for name, why in missing.items():
        print(f"report: {name} missing: {why}")
    return missing
