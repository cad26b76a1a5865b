"""Log a trained VAE as its registered pyfunc generator.

``train`` calls :func:`log_generator` (decoder + ``prior``, registered as a new version by
:func:`bam_vae.tracking.registry.register`); ``fit-sampler`` then adds each fitted sampler to
that version (:func:`bam_vae.tracking.registry.add_sampler`), so a sampler sweep never needs a
retrain and a server of the version serves the pipeline's sampler.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

import bam_vae
from bam_vae.datasets.base import DatasetInfo
from bam_vae.files import file_sha256
from bam_vae.models.saved import model_config
from bam_vae.serving import model_code
from bam_vae.tracking import registry


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
    name = registry.registered_name(model_cfg.arch, dataset.name)
    run_id = mlflow.active_run().info.run_id
    found = registry.version_of_run(run_id, name)
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
    return info.model_uri, registry.register(info.model_uri, run_id, name)


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
