"""The table of docs/results.md#the-literatures-protocol from bench/literature_table.sh's
results (REC, the FID of reconstructions, beside each FID): one markdown row per folder of
``OUT`` (default bench/results/literature), then, for a row run with several seeds (``ROW``
and ``ROW-seedN`` folders), the mean and sample standard deviation of its scores over them.

    python bench/literature_rows.py [OUT]

Training time is the model's MLflow run from its start to its last epoch's metrics (the
store in MLFLOW_TRACKING_URI or the project's); the rest comes from the copied metrics.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bam_vae.tracking import store as tracking


def training_minutes(run_id: str) -> str:
    """Minutes of training: the sum of the run's ``epoch_seconds`` (each epoch's running time,
    pauses of an interrupted run left out), or for a run logged without them, the span from
    its start to its last epoch's metrics (right only for a run never paused)."""
    client = tracking.client()
    seconds = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
    if seconds:
        return f"{sum(seconds) / 60:.1f}"
    last = max(m.timestamp for m in client.get_metric_history(run_id, "test_loss"))
    return f"{(last - client.get_run(run_id).info.start_time) / 60_000:.1f}"


def _run_id(folder: Path, name: str) -> str:
    """The model's run: from the copied ``mlflow_run.json``, else the run trained under the
    experiment's name (a row whose training came from DVC's run cache needs the file)."""
    ref = folder / "mlflow_run.json"
    if ref.is_file():
        return json.loads(ref.read_text())["run_id"]
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
        f"tags.dvc_exp_name = 'lit-{name}'",
    )
    if not runs:
        raise SystemExit(f"{folder}: no mlflow_run.json and no run tagged lit-{name}")
    return runs[0].info.run_id


def _cell(fid: dict, fmt: str, *keys: str) -> str:
    """``fmt`` of the scores ``keys``, or "–" for a row scored without one (a classifier-only
    row, or a row scored before REC existed)."""
    if not all(k in fid for k in keys):
        return "–"
    return " / ".join(format(fid[k], fmt) for k in keys)


def row(folder: Path) -> str:
    """One Markdown row: REC (the FID of the floor images' reconstructions) beside each FID."""
    fid = json.loads((folder / "fid.json").read_text())
    mem = json.loads((folder / "memorisation.json").read_text())
    if mem.get("n_samples") != fid["n_generated"]:  # a row stopped at compute-fid: not its own
        mem = {}
    train = json.loads((folder / "train.json").read_text())
    ran = json.loads((folder / "run.json").read_text())
    run_id = _run_id(folder, ran["row"])
    assert fid["protocol"]["n_generated"] == 10_000, folder  # only this protocol's rows
    cells = [
        ran["row"],
        fid["sampler"],
        str(train["epochs"]),
        training_minutes(run_id),
        f"**{_cell(fid, '.2f', 'fid_inception')}**",
        _cell(fid, ".2f", "fid_recon_inception"),
        _cell(fid, ".1f", "fid_classifier"),
        _cell(fid, ".2f", "fid_recon_classifier"),
        _cell(fid, ".4f", "kid_inception"),
        _cell(fid, ".3f", "precision_inception", "recall_inception"),
        _cell(fid, ".3f", "precision_classifier", "recall_classifier"),
        _cell(fid, ".3f", "density_inception", "coverage_inception"),
        _cell(mem, ".3f", "copy_share") + " / " + _cell(mem, ".1f", "mw_z"),
        f"{ran['processor']}, {ran['date']}, {ran['commit']}",
    ]
    return "| " + " | ".join(cells) + " |"


SEED_SCORES = ("fid_inception", "fid_classifier", "precision_inception", "recall_inception")


def seed_summaries(folders: list[Path]) -> list[str]:
    """``row (n seeds): fid_inception mean ± sd, ...`` for each row with more than one seed."""
    seeds: dict[str, list[dict]] = defaultdict(list)
    for folder in folders:
        seeds[re.sub(r"-seed\d+$", "", folder.name)].append(
            json.loads((folder / "fid.json").read_text())
        )
    lines = []
    for name, runs in sorted(seeds.items()):
        if len(runs) > 1:
            cells = []
            for key in SEED_SCORES:
                values = [r[key] for r in runs]
                cells.append(
                    f"{key} {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
                )
            lines.append(f"{name} ({len(runs)} seeds): " + ", ".join(cells))
    return lines


if __name__ == "__main__":
    tracking.init()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/literature")
    folders = sorted(p for p in out.iterdir() if (p / "run.json").is_file())
    for folder in folders:
        print(row(folder))
    print("\n".join(seed_summaries(folders)))
