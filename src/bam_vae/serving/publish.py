"""Log a trained VAE as its registered pyfunc generator; add each fitted sampler to it.

``train`` calls :func:`log_generator` (decoder + ``prior``, registered as a new version);
``fit-sampler`` calls :func:`add_sampler`, which uploads the sampler file into that version's
logged model, makes it the default and records it in the version's tags and description, so a
sampler sweep never needs a retrain and a server of the version serves the pipeline's sampler.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

import bam_vae
from bam_vae.datasets.base import DatasetInfo
from bam_vae.errors import BamError
from bam_vae.files import before_commit, file_sha256
from bam_vae.models.saved import model_config
from bam_vae.serving import model_code
from bam_vae.tracking import store

SAMPLERS = "artifacts/samplers"  # in the logged model, beside the weights


def signature(conditional: bool) -> mlflow.models.ModelSignature:
    """Input columns (``n`` and ``seed``, or ``latents``; optional ``sampler``, ``class``,
    ``digit`` (MNIST's name for class)) and
    the output, images as float32 N x 28 x 28: what the MLflow UI shows under the version.
    All optional and the numbers untyped for MLflow, so that what is missing or not an integer
    gets the wrapper's own one-line error (MLflow's JSON parsing would cast 1.5 to 1)."""
    from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

    inputs = Schema([
        ColSpec(AnyType(), "n", required=False), ColSpec(AnyType(), "seed", required=False),
        ColSpec("string", "sampler", required=False),
        ColSpec(AnyType(), "class", required=False),
        ColSpec(AnyType(), "digit", required=False),
        ColSpec(AnyType(), "latents", required=False),
    ])  # fmt: skip
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """What loading the version needs (its own code travels with it; zuko for a ``flow``
    sampler added to it later)."""
    from importlib.metadata import version

    import pydantic
    import ruamel.yaml

    versions = {
        "torch": torch.__version__.split("+")[0], "numpy": np.__version__,
        "pandas": pd.__version__, "pydantic": pydantic.__version__,
        "ruamel.yaml": ruamel.yaml.__version__, "mlflow": mlflow.__version__,
        "zuko": version("zuko"),
    }  # fmt: skip
    return [f"{name}=={version}" for name, version in versions.items()]


def log_generator(
    vae: torch.nn.Module, model_cfg, model_file: Path, dataset: DatasetInfo
) -> tuple[str, str]:
    """Log ``vae`` (saved as ``model_file``) as the active run's registered generator and
    register it as a new version of ``bam-vae-<arch>`` (``bam-vae-<dataset>-<arch>`` for
    another dataset than MNIST). Returns (model URI, version).

    A rerun after a stop between registration and the end of the stage reuses that version."""
    name = store.registered_name(model_cfg.arch, dataset.name)
    run_id = mlflow.active_run().info.run_id
    found = store.version_of_run(run_id, name)
    if found:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model.json").write_text(json.dumps(model_config(vae, model_cfg)))
        state = {k: v.detach().cpu().numpy() for k, v in vae.state_dict().items()}
        with (folder / "weights.npz").open("wb") as fh:
            np.savez(fh, **state)
        (folder / "model.sha256").write_text(file_sha256(model_file))
        info = {"name": dataset.name, "classes": list(dataset.classes)}
        (folder / "dataset.json").write_text(json.dumps(info))
        example = pd.DataFrame({"n": [2], "seed": [0]})
        if vae.conditional:
            example["class"] = [min(7, dataset.n_classes - 1)]
        with warnings.catch_warnings():  # pandas 3 deprecation inside MLflow's example handling
            warnings.filterwarnings("ignore", "Operation with range is deprecated")
            info = _log_pyfunc(folder, vae.conditional, example)
    return info.model_uri, register(info.model_uri, run_id, name)


def _log_pyfunc(folder: Path, conditional: bool, example: pd.DataFrame):
    return mlflow.pyfunc.log_model(
        name="generator",
        python_model=model_code.__file__,
        artifacts={
            "model": str(folder / "model.json"),
            "weights": str(folder / "weights.npz"),
            "digest": str(folder / "model.sha256"),
            "dataset": str(folder / "dataset.json"),
        },  # fmt: skip
        code_paths=[str(Path(bam_vae.__file__).parent)],
        signature=signature(conditional),
        input_example=example,
        pip_requirements=requirements(),
    )


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
                found = store.version_of_run(run_id, name)  # registered, but the reply was lost
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
