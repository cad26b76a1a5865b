"""What ``bam report`` and ``bam compare-samplers`` build from the MLflow store and a model:
not pipeline stages (no ``dvc.yaml`` entry), read-only on the pipeline's outputs.

- :mod:`~bam_vae.reporting.table`: the selected runs, fetched once (scores and histories)
- :mod:`~bam_vae.reporting.figures`: the report's figures, DataFrames in, PNG out
- :mod:`~bam_vae.reporting.report`: ``bam report`` (table, figures, a study's section)
- :mod:`~bam_vae.reporting.compare_samplers`: one model's samples from every sampler
"""
