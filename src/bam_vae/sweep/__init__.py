"""``bam sweep``: an Optuna study (grid or search) whose trials are DVC experiments run as
Ray tasks, one MLflow parent run above their child runs.

- :mod:`~bam_vae.sweep.space`: the ``-S`` space (comma lists, Hydra's choice/range/interval),
  checked against params before anything starts
- :mod:`~bam_vae.sweep.git`: the repository: root, clean tree, commit, clone source, identity
- :mod:`~bam_vae.sweep.study`: the plan's checks, the study's storage, the driver (Ray, pruning,
  signals, the MLflow runs settled and summarised)
- :mod:`~bam_vae.sweep.trial`: one trial, the body of a Ray task
- :mod:`~bam_vae.sweep.guard`: the process that stops a trial's commands if its worker dies

Nothing here imports Ray, MLflow or torch at import time: Ray workers import these modules.
"""
