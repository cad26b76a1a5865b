"""bam-vae: Variational AutoEncoders on MNIST as a DVC + MLflow pipeline."""

__version__ = "0.1.0"
