"""``bam sweep``: a grid of DVC experiments run as Ray tasks, one MLflow parent run above them.

- :mod:`~bam_vae.sweep.grid`: the ``-S`` grid, its points, labels and names
- :mod:`~bam_vae.sweep.git`: the repository: root, clean tree, commit, clone source, identity
- :mod:`~bam_vae.sweep.plan`: every check that needs no cluster
- :mod:`~bam_vae.sweep.trial`: one grid point, the body of a Ray task
- :mod:`~bam_vae.sweep.guard`: the process that stops a trial's commands if its worker dies
- :mod:`~bam_vae.sweep.settle`: the table, the logs, the MLflow runs settled and closed
- :mod:`~bam_vae.sweep.driver`: connect to Ray, run the trials, say how they go (``bam sweep``)

Nothing here imports Ray, MLflow or torch at import time: Ray workers import these modules.
"""
