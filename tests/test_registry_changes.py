"""Someone deletes, underneath the pipeline, the registered version, the run or the
experiment that `models/mlflow_run.json` names: every stage that writes to them says so in one
line before any work, and logs nothing half-way."""

from __future__ import annotations

import json

import mlflow
import pytest

from bam_vae.errors import BamError
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

STAGES = {
    "fit-sampler": fit_sampler,
    "generate": generate,
    "compute-fid": compute,
    "tsne": tsne,
    "robustness": robustness,
    "inspect": inspect,
}


@pytest.fixture
def scored(project, tiny):
    params = tiny(train={"epochs": 1}, evaluator={"epochs": 1, "feature_dim": 16},
                  generate={"n": 40, "per_class": 1, "gmm": {"components": 2}},
                  fid={"kid_subsets": 2, "kid_subset_size": 20}, tsne={"n": 50, "perplexity": 5},
                  robustness={"n": 10})  # fmt: skip
    fit(params)
    train_evaluator(params.evaluator, params.data.out_dir)
    reference(params, "classifier")
    fit_sampler(params)
    generate(params)
    ref = json.loads((project / "models/mlflow_run.json").read_text())
    return params, ref


def logged(run_id: str) -> tuple:
    """What the run holds: its metrics, tags and artifacts (to show nothing was added)."""
    client = tracking.client()
    run = client.get_run(run_id)

    def files(path=None):
        found = []
        for item in client.list_artifacts(run_id, path):
            found += files(item.path) if item.is_dir else [item.path]
        return found

    return dict(run.data.metrics), dict(run.data.tags), sorted(files())


def delete(what: str, ref: dict) -> str:
    client = tracking.client()
    if what == "version":
        client.delete_model_version(ref["model_name"], ref["model_version"])
        return f"registered version {ref['model_name']}/{ref['model_version']}"
    if what == "run":
        client.delete_run(ref["run_id"])
        return f"MLflow run {ref['run_id']}"
    client.delete_experiment(ref["experiment_id"])
    return f"MLflow experiment {ref['experiment_id']}"


@pytest.mark.slow
@pytest.mark.parametrize("what", ["version", "run", "experiment"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_refuses_before_any_work_when_its_run_or_version_is_gone(scored, what, stage):
    params, ref = scored
    before = logged(ref["run_id"])
    gone = delete(what, ref)
    with pytest.raises(BamError) as err:
        STAGES[stage](params)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{stage}: {gone}") and "is gone" in message, message
    assert "bam train" in message  # how to remake it
    if what == "version":  # the run is still there: nothing was added to it
        assert logged(ref["run_id"]) == before
    else:
        restored = tracking.client()
        if what == "experiment":
            restored.restore_experiment(ref["experiment_id"])
        else:
            restored.restore_run(ref["run_id"])
        assert logged(ref["run_id"]) == before
    mlflow.end_run()
