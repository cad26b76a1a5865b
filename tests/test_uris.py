"""Passwords never shown: the URIs bam prints and logs (stores, studies, servers)."""

from __future__ import annotations

import pytest

from bam_vae.uris import has_password, mask


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://bam:s3cret@db.lan:5432/mlflow", "postgresql://bam:***@db.lan:5432/mlflow"),
        ("postgresql+psycopg://bam:p%40ss@10.0.0.2/optuna", "postgresql+psycopg://bam:***@10.0.0.2/optuna"),
        ("https://alice:pw@mlflow.lan:5000", "https://alice:***@mlflow.lan:5000"),
        ("postgresql://bam@db.lan/mlflow", "postgresql://bam@db.lan/mlflow"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
        (".cache/sweeps/optuna.journal", ".cache/sweeps/optuna.journal"),
    ],
)  # fmt: skip
def test_mask_hides_only_the_password(uri, shown):
    assert mask(uri) == shown
    assert has_password(uri) == (shown != uri)
