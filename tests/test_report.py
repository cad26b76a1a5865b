"""`bam report` and `bam promote`: comparisons read back from the MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from bam_vae.errors import BamError
from bam_vae.reporting.report import report
from bam_vae.reporting.table import collect, same_n
from bam_vae.stages.generate import generate
from bam_vae.stages.train import fit
from bam_vae.tracking import store as tracking
from bam_vae.tracking.registry import promote


def fake_run(
    arch: str, z_dim: int, k1: float, fid: float, sweep: str, epochs: int = 3, n: int = 1024,
    dataset: str | None = None,
) -> None:  # fmt: skip
    """A finished training run as `train` + `compute-fid` leave it (no model weights); without
    ``dataset``, as runs logged before other datasets existed (no tag: MNIST)."""
    with mlflow.start_run():
        params = {"model.arch": arch, "model.z_dim": z_dim, "train.k1": k1, "train.k2": 1 - k1}
        mlflow.log_params(params | {"train.epochs": epochs, "train.train_fraction": 1.0})
        mlflow.set_tags({"sweep": sweep, "dvc_exp_name": f"{arch}-{z_dim}-{k1}"})
        if dataset:
            mlflow.set_tag("dataset", dataset)
        for step in range(1, epochs + 1):
            mlflow.log_metrics(
                {"train_loss": 30 / step + z_dim / 100, "test_loss": 31 / step}, step=step
            )
        scores = {"fid_classifier": fid, "fid_floor_classifier": 2.0, "kid_classifier": fid / 10}
        scores |= {"digit_entropy": 0.95, "n_generated": n}
        scores |= {"precision_classifier": 0.8 - fid / 200, "recall_classifier": 0.3 + z_dim / 400}
        mlflow.log_metrics({f"prior/{k}": v for k, v in scores.items()})
        # A good sampler on the same model: every score again under its name.
        mlflow.log_metrics({f"gmm/{k}": v / 2 for k, v in scores.items() if k != "n_generated"})
        mlflow.log_metric("gmm/n_generated", n)


@pytest.fixture
def latent_sweep(project):
    tracking.init()
    for arch, offset in (("dense", 10.0), ("cnn", 0.0)):
        for z in (1, 4, 16, 128):
            fake_run(arch, z, 0.5, fid=offset + abs(np.log2(z) - 4) * 5 + 8, sweep="latent")
    fake_run("cnn", 16, 0.9, fid=50.0, sweep="other")
    return project


@pytest.mark.slow
def test_report_of_a_latent_sweep(latent_sweep):
    out = latent_sweep / "reports"
    missing = report(sweep="latent", out_dir=out)
    table = pd.read_csv(out / "runs.csv")
    # One row per (run, sampler): 8 runs scored with two samplers each.
    assert len(table) == 16 and set(table["sweep"]) == {"latent"}
    assert table.groupby("sampler").size().to_dict() == {"gmm": 8, "prior": 8}
    assert "(8 runs, 16 rows" in (out / "runs.md").read_text()
    by_sampler = table.pivot_table(index="run_id", columns="sampler", values="fid_classifier")
    np.testing.assert_allclose(by_sampler["gmm"], by_sampler["prior"] / 2)
    wanted = {
        "arch",
        "z_dim",
        "sampler",
        "fid_classifier",
        "fid_floor_classifier",
        "kid_classifier",
    }
    # Runs logged before other datasets named it digit_entropy: read as class_entropy.
    wanted |= {
        "dataset",
        "class_entropy",
        "train_loss",
        "test_loss",
        "dvc_exp_name",
        "model_version",
    }
    assert wanted <= set(table.columns)
    for fig in ("fig6a_fid_vs_zdim.png", "fig5_loss_vs_zdim.png", "fig2_loss_curves.png",
                "precision_recall.png"):  # fmt: skip
        assert (out / fig).stat().st_size > 1000, fig
    assert {"precision_classifier", "recall_classifier"} <= set(table.columns)
    np.testing.assert_allclose(table.groupby("run_id")["recall_classifier"].max(),
                               0.3 + table.groupby("run_id")["z_dim"].first() / 400)  # fmt: skip
    # Only one k1 value in this sweep: Figure 6b cannot be drawn and the report says so.
    assert "fig6b_fid_vs_k1.png" in missing and not (out / "fig6b_fid_vs_k1.png").exists()
    markdown = (out / "runs.md").read_text()
    assert (
        "| arch |" in markdown.replace("| run_id | dvc_exp_name | sweep |", "|")
        or "arch" in markdown
    )
    assert (
        "fig6b_fid_vs_k1.png: needs runs with FID and at least two values of k1_share" in markdown
    )
    # The report itself is logged to MLflow as a run of its own.
    reports = mlflow.search_runs(
        experiment_names=["bam-vae"], filter_string="tags.bam_kind = 'report'"
    )
    assert len(reports) == 1


@pytest.mark.slow
def test_runs_of_two_datasets_are_never_on_one_curve(latent_sweep):
    tracking.init()
    for z in (1, 4, 16, 128):
        fake_run("cnn", z, 0.5, fid=1.0 + z, sweep="latent", dataset="fashion-mnist")
    table = collect(sweep="latent")
    assert table.groupby("dataset")["run_id"].nunique().to_dict() == {
        "fashion-mnist": 4, "mnist": 8}  # fmt: skip
    only = collect(sweep="latent", dataset="fashion-mnist")
    assert set(only["dataset"]) == {"fashion-mnist"} and only["run_id"].nunique() == 4
    out = latent_sweep / "reports"
    report(sweep="latent", out_dir=out, dataset="mnist")
    assert set(pd.read_csv(out / "runs.csv")["dataset"]) == {"mnist"}
    assert "dataset = mnist" in (out / "runs.md").read_text()


@pytest.mark.slow
def test_report_from_a_subfolder_writes_into_the_project_root(latent_sweep, monkeypatch):
    from typer.testing import CliRunner

    from bam_vae.cli import app

    sub = latent_sweep / "src" / "bam_vae"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    done = CliRunner().invoke(app, ["report", "--sweep", "latent"])
    assert done.exit_code == 0, done.output
    assert (latent_sweep / "reports" / "runs.csv").is_file()
    assert not (sub / "reports").exists()


@pytest.mark.slow
def test_scores_from_another_number_of_images_are_listed_not_drawn(latent_sweep, capsys):
    # Scored from 16 images: a low FID that must not join the N = 1024 curves.
    tracking.init()
    fake_run("cnn", 16, 0.5, fid=1.0, sweep="latent", n=16)
    out = latent_sweep / "reports"
    report(sweep="latent", out_dir=out)
    table = pd.read_csv(out / "runs.csv")
    assert sorted(table["n_generated"].unique()) == [16, 1024] and len(table) == 18
    note = (
        "FID figures use the scores from N = 1024 images; 2 rows scored from other numbers of"
        " images are in the table only: N = 16 (2 rows)"
    )
    assert note in (out / "runs.md").read_text() and f"report: {note}" in capsys.readouterr().out
    comparable, left = same_n(collect(sweep="latent"))
    assert set(comparable["n_generated"]) == {1024} and left == note


@pytest.mark.slow
def test_report_with_a_query_and_with_nothing_selected(latent_sweep):
    out = latent_sweep / "reports"
    report(query="params.`model.arch` = 'cnn' and tags.sweep = 'other'", out_dir=out)
    assert len(pd.read_csv(out / "runs.csv")) == 2
    missing = report(sweep="no-such-sweep", out_dir=out)
    assert set(missing) == {"fig6a_fid_vs_zdim.png", "fig6b_fid_vs_k1.png",
                            "fig5_loss_vs_zdim.png", "fig2_loss_curves.png",
                            "precision_recall.png"}  # fmt: skip
    assert "(0 runs, 0 rows" in (out / "runs.md").read_text()


@pytest.mark.slow
def test_bad_query_is_one_clear_line(latent_sweep):
    with pytest.raises(BamError, match="bad run query"):
        report(query="params.nonsense ===", out_dir=latent_sweep / "reports")


@pytest.mark.slow
def test_promote_points_champion_at_the_lowest_fid_and_generate_uses_it(project, tiny, capsys):
    fit(tiny())
    fit(tiny(model={"z_dim": 2}))
    client = tracking.client()
    # Version 1 is best with the prior (a bare tag: scored before samplers existed), version 2
    # with the mixture.
    for version, prior, gmm in (("1", 20.0, 15.0), ("2", 30.0, 10.0)):
        client.set_model_version_tag("bam-vae-cnn", version, "fid_classifier", str(prior))
        client.set_model_version_tag("bam-vae-cnn", version, "gmm/fid_classifier", str(gmm))
    assert promote("classifier", sampler="prior") == {"bam-vae-cnn": "1"}
    assert promote("classifier", sampler="gmm") == {"bam-vae-cnn": "2"}
    assert str(client.get_model_version_by_alias("bam-vae-cnn", "champion").version) == "2"

    params = tiny(generate={"n": 16, "sampler": "prior"})
    generate(params, model_uri="models:/bam-vae-cnn@champion", out_dir=project / "gen",
             fig_dir=project / "fig")  # fmt: skip
    images = np.load(project / "gen/images.npy")
    assert images.shape == (16, 28, 28)
    # It really is version 2 (z_dim 2), not the pipeline's latest model file.
    assert json.loads((project / "models/mlflow_run.json").read_text())["model_version"] == "2"
    # A third version scored from 16 images has the lowest FID: named, not ranked.
    fit(tiny(model={"z_dim": 3}))
    for version, n in (("1", 1024), ("2", 1024), ("3", 16)):
        client.set_model_version_tag("bam-vae-cnn", version, "gmm/n_generated", str(n))
    client.set_model_version_tag("bam-vae-cnn", "3", "gmm/fid_classifier", "1.0")
    capsys.readouterr()
    assert promote("classifier", sampler="gmm") == {"bam-vae-cnn": "2"}
    assert capsys.readouterr().out.splitlines() == [
        "promote: bam-vae-cnn@champion -> version 2 (gmm/fid_classifier 10.000, ranked among 2"
        " versions scored from N = 1024 images)",
        "promote: bam-vae-cnn: not ranked, scored from other numbers of images: 3 (N = 16)",
    ]


@pytest.mark.slow
def test_promote_without_scores_says_what_to_run(project, tiny):
    fit(tiny())
    with pytest.raises(BamError, match="no registered version has gmm/fid_inception"):
        promote("inception")
    with pytest.raises(BamError, match="--sampler: unknown sampler 'vae'"):
        promote("classifier", sampler="vae")
