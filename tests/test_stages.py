"""Every architecture goes through the same stages: train, generate, score, t-SNE, robustness."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import PIXELCNN_TINY

from bam_vae.config import EvaluatorConfig
from bam_vae.errors import BamError, Interrupted
from bam_vae.files import exclusive
from bam_vae.reporting.compare_samplers import compare_samplers
from bam_vae.stages import fid_reference as fid
from bam_vae.stages.compute_fid import compute
from bam_vae.stages.fid_reference import reference
from bam_vae.stages.fit_sampler import fit_sampler
from bam_vae.stages.generate import generate
from bam_vae.stages.inspect import inspect
from bam_vae.stages.robustness import robustness
from bam_vae.stages.train import fit
from bam_vae.stages.train_evaluator import train_evaluator
from bam_vae.stages.tsne import tsne
from bam_vae.tracking import store as tracking

MODELS = {
    "dense": {"hidden": [32, 16]},
    "cnn": {},
    "cvae": {},
    "vqvae": {"vq": {"codebook_size": 16, "code_dim": 4}},
    "introvae": {"intro": {"warmup_epochs": 0}},
    "rae": {"channels": [4, 8, 8], "batch_norm": True},
}
SCORING = {
    "generate": {"n": 60, "per_class": 1},
    "fid": {"kid_subsets": 3, "kid_subset_size": 50},
    "tsne": {"n": 100, "perplexity": 10},
    "robustness": {"n": 20},
}


@pytest.fixture(scope="module")
def evaluator_file(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluator")
    cfg = EvaluatorConfig(epochs=1, batch_size=64, feature_dim=16, device="cpu", threads=1)
    train_evaluator(cfg, tiny_mnist, out / "evaluator.pt", out / "evaluator.json")
    return out / "evaluator.pt"


# Every sampler is exercised by some arch; auto (each arch's default) by dense, cvae, vqvae.
SAMPLER = {"dense": "auto", "cnn": "two-stage", "cvae": "auto", "vqvae": "auto",
           "introvae": "two-stage", "rae": "flow"}  # fmt: skip
FITTED = SAMPLER | {"dense": "gmm", "cvae": "gmm", "vqvae": "pixelcnn"}
FAST_SAMPLERS = {"gmm": {"components": 3}, "two_stage": {"epochs": 2, "hidden": 16},
                 "flow": {"epochs": 2, "hidden": 16, "transforms": 2},
                 "pixelcnn": PIXELCNN_TINY}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_arch_runs_every_stage(arch, project, tiny, evaluator_file):
    model = {"arch": arch, "z_dim": 4, "channels": [8, 16], **MODELS[arch]}
    scoring = SCORING | {"generate": SCORING["generate"] | FAST_SAMPLERS}
    scoring["generate"]["sampler"] = SAMPLER[arch]
    params = tiny(model=model, train={"epochs": 1}, **scoring)
    (project / "models").mkdir(exist_ok=True)
    shutil.copy(evaluator_file, project / "models/evaluator.pt")

    fit(params)
    fit_sampler(params)
    reference(params, "classifier")
    generate(params)
    metrics = compute(params)
    tsne(params)
    robust = robustness(params)
    looked = inspect(params)

    images = np.load(project / "data/generated/images.npy")
    assert images.shape == (60, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert np.isfinite(metrics["fid_classifier"]) and metrics["fid_floor_classifier"] >= 0
    for share in ("precision", "recall", "coverage"):
        assert 0 <= metrics[f"{share}_classifier"] <= 1
    # What the scores come from: N, the reference and the floor's images, network, precision.
    protocol = metrics["protocol"]
    assert protocol["n_generated"] == 60
    assert protocol["spaces"]["classifier"] | {"network": "", "dim": 0} == {
        "network": "", "dim": 0, "precision": "fp32", "reference": "256 test images",
        "floor": "60 training images against the 256 test images",
        "precision_recall": "60 test images; prdc, P/R k=3, D/C k=5", "pad_to": 28,
        "recon": "posterior-mean reconstructions of 60 floor training images",
    }  # fmt: skip
    assert protocol["images"] == "float32"
    # REC: the reconstructions of the floor's originals, scored like the samples.
    assert np.load(project / "data/generated/reconstructions.npy").shape == (60, 28, 28)
    assert metrics["fid_recon_classifier"] > metrics["fid_floor_classifier"]
    assert 0 <= metrics["precision_recon_classifier"] <= 1
    assert metrics["sampler"] == FITTED[arch]
    assert ("label_accuracy" in metrics) == (arch == "cvae")
    assert 0 <= robust["auroc_neg_elbo_gaussian"] <= 1
    assert 0 <= looked["copy_share"] <= 1 and looked["n_samples"] == 60
    assert json.loads((project / "metrics/memorisation.json").read_text()) == looked
    for fig in ("samples", "reconstructions", "tsne", "robustness", "nearest", "interpolations",
                "traversals"):  # fmt: skip
        assert (project / f"figures/{fig}.png").stat().st_size > 500
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    assert ref["model_name"] == f"bam-vae-{arch}"
    run = mlflow.get_run(ref["run_id"])
    assert f"{FITTED[arch]}/fid_classifier" in run.data.metrics
    assert f"{FITTED[arch]}/precision_classifier" in run.data.metrics
    assert run.data.tags[f"{FITTED[arch]}/protocol"] == (
        "N=60 float32 vs 256 test images; classifier fp32"
    )
    assert f"{FITTED[arch]}/fid_recon_classifier" in run.data.metrics
    assert "auroc_neg_elbo_uniform" in run.data.metrics
    artifacts = {a.path for a in tracking.client().list_artifacts(ref["run_id"], "figures")}
    assert artifacts == {f"figures/{FITTED[arch]}", "figures/reconstructions.png",
                         "figures/tsne.png", "figures/robustness.png", "figures/nearest.png",
                         "figures/interpolations.png", "figures/traversals.png"}  # fmt: skip
    assert f"{FITTED[arch]}/copy_share" in mlflow.get_run(ref["run_id"]).data.metrics
    version = tracking.client().get_model_version(ref["model_name"], ref["model_version"])
    assert f"{FITTED[arch]}/fid_classifier" in version.tags
    # The registered version is a pyfunc generator that serves the pipeline's own samples.
    assert version.tags["sampler"] == FITTED[arch]
    served = mlflow.pyfunc.load_model(f"models:/bam-vae-{arch}/1")
    request = pd.DataFrame({"n": [60], "seed": [params.generate.seed]})
    np.testing.assert_allclose(served.predict(request), images, atol=1e-6)
    if arch == "cvae":
        request["digit"] = [7]  # MNIST's name for the class column
        assert served.predict(request).shape == (60, 28, 28)
        request = request.drop(columns="digit").assign(**{"class": ["7"]})  # by class name
        assert served.predict(request).shape == (60, 28, 28)


@pytest.mark.slow
def test_class_option_draws_one_class_from_a_conditional_model(project, tiny):
    params = tiny(model={"arch": "cvae", "z_dim": 4, "channels": [8, 16]}, train={"epochs": 1},
                  generate={"n": 12, "per_class": 1, "gmm": {"components": 2}})  # fmt: skip
    fit(params)
    fit_sampler(params)
    generate(params, label=7)
    assert set(np.load(project / "data/generated/labels.npy").tolist()) == {7}


@pytest.mark.slow
def test_class_option_is_refused_for_unconditional_models(project, tiny):
    params = tiny(train={"epochs": 1}, generate={"n": 12, "per_class": 1, "sampler": "prior"})
    fit(params)
    with pytest.raises(BamError, match="--class 3: model CNNVAE is not conditional"):
        generate(params, label=3)
    assert not (project / "data/generated/images.npy").exists()


def test_workers_starting_together_compute_the_reference_once(
    project, tiny, evaluator_file, monkeypatch, tmp_path, capsys
):
    """Two queue workers reaching fid-reference at once: the second waits for the first
    (it used to write the same chunks and fail when the first removed them), then reads the
    machine's cache and computes nothing."""
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path / "machine-cache"))
    params = tiny()
    (project / "models").mkdir()
    shutil.copy(evaluator_file, project / "models/evaluator.pt")
    expected = np.load(reference(params, "classifier", chunk=64))
    (cached,) = (tmp_path / "machine-cache/fid-reference").glob("classifier-test-*.npy")
    features = cached.read_bytes()
    cached.unlink()
    calls: list[int] = []
    real = fid.feature_extractor

    def counted_extractor(space, cfg):
        extract, weights = real(space, cfg)
        return (lambda images: calls.append(len(images)) or extract(images)), weights

    monkeypatch.setattr(fid, "feature_extractor", counted_extractor)
    capsys.readouterr()
    lock = cached.parent / f".{cached.stem}.lock"
    with exclusive(lock, "the first worker"):  # the first worker, computing
        second = threading.Thread(
            target=reference, args=(params, "classifier"), kwargs={"chunk": 64}
        )
        second.start()
        said = ""
        deadline = time.monotonic() + 60
        while "waiting for it" not in said and time.monotonic() < deadline and not calls:
            time.sleep(0.05)
            said += capsys.readouterr().out
        assert "is being written by pid" in said and calls == [], said
        cached.write_bytes(features)  # the first worker finishes
    second.join(timeout=60)
    assert not second.is_alive() and calls == []
    np.testing.assert_array_equal(np.load(project / "data/fid_ref/classifier.npy"), expected)


def test_reference_is_cached_per_machine_and_resumes_from_its_saved_chunks(
    project, tiny, evaluator_file, monkeypatch, tmp_path
):
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path / "machine-cache"))
    cache = tmp_path / "machine-cache/fid-reference"
    params = tiny()
    (project / "models").mkdir()
    shutil.copy(evaluator_file, project / "models/evaluator.pt")
    expected = np.load(reference(params, "classifier", chunk=64))  # 256 test images: 4 chunks
    (cached,) = cache.glob("classifier-test-*.npy")

    calls: list[int] = []
    real = fid.feature_extractor

    def interrupted_at_third_chunk(space, cfg):
        extract, weights = real(space, cfg)

        def counted(images):
            calls.append(len(images))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return extract(images)

        return counted, weights

    monkeypatch.setattr(fid, "feature_extractor", interrupted_at_third_chunk)
    out = project / "data/fid_ref/classifier.npy"
    out.unlink()
    cached.unlink()
    with pytest.raises(Interrupted, match="2 of 4 chunks saved.*run again to resume"):
        reference(params, "classifier", chunk=64)
    assert not out.exists() and not cached.exists()

    calls.clear()
    reference(params, "classifier", chunk=64)
    assert calls == [64, 64]  # only the chunks that were missing
    np.testing.assert_array_equal(np.load(out), expected)
    kept = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert kept == sorted([cached.name, *[p.name for p in cache.glob("classifier-train-*.npy")]])
    assert len(kept) == 2  # chunks gone, features of the test and the floor's images kept

    # Another checkout on this machine: the features come from the cache, nothing is computed.
    calls.clear()
    other = tmp_path / "other-clone"
    shutil.copytree(project / "models", other / "models")
    monkeypatch.chdir(other)
    np.testing.assert_array_equal(np.load(reference(params, "classifier", chunk=64)), expected)
    assert calls == []


@pytest.mark.slow
def test_registered_version_generates_with_its_own_logged_sampler(project, tiny):
    params = tiny(train={"epochs": 1}, generate={"n": 32, "per_class": 1, **FAST_SAMPLERS})
    fit(params)
    fit_sampler(params)
    generate(params)
    expected = np.load(project / "data/generated/images.npy")
    (project / "models/sampler.npz").unlink()  # a fresh clone has only the registry
    generate(params, model_uri="models:/bam-vae-cnn/1", out_dir=project / "gen",
             fig_dir=project / "fig")  # fmt: skip
    np.testing.assert_allclose(np.load(project / "gen/images.npy"), expected, atol=1e-6)
    two_stage = tiny(generate={"n": 32, "per_class": 1, "sampler": "two-stage"})
    with pytest.raises(BamError, match="has no sampler/two-stage.npz artifact"):
        generate(two_stage, model_uri="models:/bam-vae-cnn/1", out_dir=project / "gen")


@pytest.mark.slow
def test_sampler_of_an_older_model_is_refused_and_nothing_is_overwritten(project, tiny):
    params = tiny(train={"epochs": 1}, generate={"n": 16, "per_class": 1, **FAST_SAMPLERS})
    fit(params)
    fit_sampler(params)
    generate(params)
    before = (project / "data/generated/images.npy").read_bytes()
    fit(tiny(train={"epochs": 1, "seed": 1}))  # a new model; the sampler is now stale
    with pytest.raises(BamError, match="sampler file models/sampler.npz was fitted to another"):
        generate(params)
    assert (project / "data/generated/images.npy").read_bytes() == before


@pytest.mark.slow
def test_compare_samplers_draws_one_panel_per_sampler(project, tiny, capsys):
    params = tiny(train={"epochs": 1}, generate={"per_class": 1, **FAST_SAMPLERS})
    fit(params)
    fit_sampler(params)  # gmm is logged in the run; two-stage is fitted on the fly
    out = compare_samplers(params, out=project / "samplers.png")
    assert out.stat().st_size > 5000
    assert "prior, gmm, two-stage" in capsys.readouterr().out


def test_compare_samplers_takes_the_checkout_lock_before_any_work(project):
    from typer.testing import CliRunner

    from bam_vae.cli import app
    from bam_vae.paths import lock_file

    (project / "params.yaml").write_text("{}\n")  # the defaults
    figure = project / "figures" / "samplers.png"
    with exclusive(lock_file(), "a running stage"):
        done = CliRunner().invoke(app, ["compare-samplers", "--out", str(figure)])
    assert done.exit_code == 2 and "in use by pid" in done.output, done.output
    assert not figure.exists()


def test_the_report_figures_are_drawn_from_dataframes_alone(tmp_path):
    """No store, no MLflow: the table and histories a report fetched are all they read."""
    import pandas as pd

    from bam_vae.reporting import figures

    nan = float("nan")  # run c: a trial that failed before it logged its params or scores
    table = pd.DataFrame({
        "run_id": ["a", "b", "c"], "dataset": "mnist", "arch": "cnn", "sampler": "gmm",
        "z_dim": [2, 8, nan], "k1": 0.5, "epochs": 2, "train_fraction": 1.0,
        "train_loss": [3.0, 2.0, 5.0], "test_loss": [3.5, 2.5, 5.5],
        "fid_classifier": [9.0, 4.0, nan], "fid_floor_classifier": 1.0, "fid_inception": nan,
        "fid_floor_inception": nan, "precision_classifier": [0.5, 0.7, nan],
        "recall_classifier": [0.4, 0.6, nan], "precision_inception": nan,
    })  # fmt: skip
    history = pd.DataFrame(
        [(r, m, step, 4.0 - step) for r in "abc" for m in ("train_loss", "test_loss")
         for step in (1, 2)], columns=["run_id", "metric", "step", "value"])  # fmt: skip
    drawn = {
        "6a": figures.fid_vs(table, "z_dim", tmp_path / "6a.png", "6a", logx=True),
        "5": figures.loss_vs_zdim(table, tmp_path / "5.png"),
        "2": figures.loss_curves(table, history, tmp_path / "2.png"),
        "pr": figures.precision_recall(table, tmp_path / "pr.png"),
    }
    assert drawn == dict.fromkeys(drawn)  # every one drawn: no reason returned
    assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in drawn)
    why = figures.fid_vs(table.head(1), "z_dim", tmp_path / "one.png", "6a", logx=True)
    assert "at least two values of z_dim" in why and not (tmp_path / "one.png").exists()


def test_no_stage_imports_another_and_only_cli_imports_stages():
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "bam_vae"
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        stages = {m for m in imported if m.startswith("bam_vae.stages")}
        if path.name != "cli.py":
            assert not stages, f"{path.relative_to(src)} imports {sorted(stages)}"


def generated_by_prior(project, tiny, evaluator_file, n: int):
    """A tiny model trained, its classifier reference and ``n`` images drawn from its prior."""
    params = tiny(train={"epochs": 1}, generate={"sampler": "prior", "n": n}, **{
        k: v for k, v in SCORING.items() if k != "generate"})  # fmt: skip
    (project / "models").mkdir(exist_ok=True)
    shutil.copy(evaluator_file, project / "models/evaluator.pt")
    fit(params)
    fit_sampler(params)
    reference(params, "classifier")
    generate(params)
    return params


@pytest.mark.slow
def test_scoring_works_with_a_scipy_whose_sqrtm_has_no_disp(project, tiny, evaluator_file,
                                                            monkeypatch):  # fmt: skip
    """scipy 1.18 removed ``sqrtm``'s ``disp`` argument (pytorch-fid 0.3.0 still passes it)."""
    import scipy.linalg

    sqrtm = scipy.linalg.sqrtm

    def sqrtm_without_disp(a, *args, **kwargs):
        if args or kwargs:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        return sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    metrics = compute(generated_by_prior(project, tiny, evaluator_file, n=60))
    assert metrics["fid_classifier"] > metrics["fid_floor_classifier"] > 0


@pytest.mark.slow
def test_scores_say_how_many_images_they_come_from(project, tiny, evaluator_file, capsys):
    params = generated_by_prior(project, tiny, evaluator_file, n=1)
    # One image has no covariance: refused in one line, nothing written or logged.
    with pytest.raises(BamError) as info:
        compute(params)
    assert str(info.value) == (
        "compute-fid: 1 generated image in data/generated/images.npy cannot define a"
        " covariance; FID and KID need at least 2 -- expected generate.n >= 2 (1024 to compare"
        " with the report)"
    )
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert not any("fid" in k for k in mlflow.get_run(run_id).data.metrics)
    assert not (project / "metrics/fid.json").exists()

    # Ten images in a 16-d feature space: scored, with the N, the KID subset size really
    # used and warnings, in fid.json and in MLflow.
    generate(params.model_copy(update={"generate": params.generate.model_copy(update={"n": 10})}))
    capsys.readouterr()
    metrics = compute(params)
    assert metrics["n_generated"] == 10 and metrics["kid_subset_size_classifier"] == 10
    assert metrics["kid_subsets"] == params.fid.kid_subsets
    assert metrics["warnings"] == [
        "fid_classifier from 10 images in a 16-d feature space: fewer images than dimensions"
        " make the covariance singular and FID biased upwards; compare it only with scores"
        " from the same number of images",
        "kid_classifier from subsets of 10 images, not fid.kid_subset_size=50 (only 10 generated)",
    ]
    assert json.loads((project / "metrics/fid.json").read_text())["warnings"] == metrics["warnings"]
    err = capsys.readouterr().err
    assert err.count("compute-fid: warning: ") == 2
    logged = mlflow.get_run(run_id).data.metrics
    assert logged["prior/n_generated"] == 10 and logged["prior/kid_subset_size_classifier"] == 10
    stored = mlflow.artifacts.load_dict(f"runs:/{run_id}/metrics/fid_prior.json")
    assert stored["warnings"] == metrics["warnings"]


@pytest.mark.slow
def test_images_without_labels_go_through_every_stage_in_the_inception_space(project):
    """A folder of images with no classes: no classifier (said in one line), the Inception
    space scored, class metrics skipped, every figure drawn."""
    from PIL import Image

    from bam_vae.config import parse_params
    from bam_vae.stages.prepare import prepare

    rng = np.random.default_rng(0)
    folder = project / "faces"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    params = parse_params({
        "data": {"dataset": "images", "path": str(folder), "out_dir": str(project / "prepared")},
        "model": {"z_dim": 4, "channels": [8, 16]}, "train": {"epochs": 1, "threads": 1},
        "generate": {"n": 8, "per_class": 1, "gmm": {"components": 2}},
        "fid": {"features": ["inception"], "kid_subsets": 2, "kid_subset_size": 4,
                "pad_to": 32},
        "tsne": {"n": 20, "perplexity": 3}, "robustness": {"n": 10},
    })  # fmt: skip
    prepare(params.data, metrics_path=project / "data.json")
    fit(params)
    skipped = train_evaluator(params.evaluator, params.data.out_dir)
    assert "has no labels" in skipped["skipped"] and skipped["n_classes"] == 0
    with pytest.raises(BamError, match="no labels, so there is no classifier") as err:
        reference(params, "classifier")
    assert "\n" not in str(err.value)
    reference(params, "inception")
    fit_sampler(params)
    generate(params)
    scores = compute(params)
    assert scores["fid_inception"] > 0 and "class_entropy" not in scores
    assert scores["protocol"]["spaces"]["inception"]["pad_to"] == 32
    assert scores["fid_recon_inception"] > 0
    assert any("no labels" in w for w in scores["warnings"])
    assert "gaussian_confident_class_share" not in robustness(params)
    tsne(params)
    assert 0 <= inspect(params)["copy_share"] <= 1
    for figure in ("samples", "reconstructions", "tsne", "robustness", "nearest",
                   "interpolations", "traversals"):  # fmt: skip
        assert (project / f"figures/{figure}.png").is_file(), figure
    assert tracking.read_run_ref()["model_name"] == "bam-vae-faces-cnn"


@pytest.mark.slow
def test_rec_scores_the_floors_own_images_and_quantize_rounds_to_8_bits(
    project, tiny, evaluator_file, monkeypatch
):
    """A decoder that gave back its input exactly would score REC = the floor: the
    reconstructions are of the very training images the floor draws."""
    from bam_vae.models.base import VAE

    params = generated_by_prior(project, tiny, evaluator_file, n=80)
    blurred = compute(params)
    assert blurred["fid_recon_classifier"] > blurred["fid_floor_classifier"] > 0

    monkeypatch.setattr(VAE, "reconstruct", lambda self, x, y=None: x)  # a perfect decoder
    generate(params)
    perfect = compute(params)
    assert perfect["fid_recon_classifier"] == pytest.approx(perfect["fid_floor_classifier"])
    assert perfect["fid_classifier"] == blurred["fid_classifier"]  # same samples

    eight_bit = params.model_copy(update={"fid": params.fid.model_copy(update={"quantize": True})})
    quantized = compute(eight_bit)
    assert quantized["protocol"]["images"] == "uint8"
    # 8-bit originals stay themselves; the float samples move.
    assert quantized["fid_recon_classifier"] == pytest.approx(perfect["fid_recon_classifier"])
    assert quantized["fid_classifier"] != perfect["fid_classifier"]
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert mlflow.get_run(run_id).data.tags["prior/protocol"].startswith("N=80 uint8 vs")


@pytest.mark.slow
def test_the_floor_holds_when_samples_are_as_many_as_the_test_images(project, tiny, evaluator_file):
    # N = the whole test set (the literature's 10 000 of 10 000): the floor's real images are
    # held-out training images, so it stays a positive FID instead of the test set against
    # itself (0); fewer floor images than samples is said.
    params = generated_by_prior(project, tiny, evaluator_file, n=256)
    metrics = compute(params)
    # The test set against itself would be 0 up to rounding (~1e-12).
    assert metrics["fid_classifier"] / 10 > metrics["fid_floor_classifier"] > 1e-4
    assert metrics["protocol"]["spaces"]["classifier"]["floor"] == (
        "256 training images against the 256 test images"
    )
    fewer = params.model_copy(update={"fid": params.fid.model_copy(update={"floor_n": 100})})
    reference(fewer, "classifier")
    assert len(np.load(project / "data/fid_ref/classifier-train.npy")) == 100
    assert (
        "fid_floor_classifier from 100 training images, fewer than the 256 generated"
        " (fid.floor_n=100): the floor is biased upwards"
    ) in compute(fewer)["warnings"]
