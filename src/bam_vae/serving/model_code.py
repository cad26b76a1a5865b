"""The file MLflow's models-from-code logs and runs to load a registered version."""

import mlflow

from bam_vae.serving.generator import GeneratorModel

mlflow.models.set_model(GeneratorModel())
