"""The whole pipeline on a second dataset, as a user switches to it: `dvc repro` with
`data.dataset: fashion-mnist` (from Debian's package), then `bam serve` of its registered
version answering one request; and a user's own image folder through `dvc exp run`."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
from helpers import bam_serve, copy_checkout, served_images
from PIL import Image
from test_pipeline import TINY, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def rows(root, sql: str) -> list[tuple]:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return db.execute(sql).fetchall()


def test_fashion_mnist_pipeline_then_serve_then_own_images(tmp_path):
    root = copy_checkout(tmp_path, {**TINY, "data": {"dataset": "fashion-mnist",
                                                     "sources": ["package"]}})  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, root)
    run(["dvc", "repro"], root)

    data = json.loads((root / "metrics/data.json").read_text())
    assert data["dataset"] == "fashion-mnist" and data["source"].startswith("debian:")
    assert data["classes"][9] == "Ankle boot" and data["train"]["class_counts"] == [6000] * 10
    evaluator = json.loads((root / "metrics/evaluator.json").read_text())
    assert evaluator["dataset"] == "fashion-mnist" and evaluator["n_classes"] == 10
    fid = json.loads((root / "metrics/fid.json").read_text())
    assert fid["classes"][0] == "T-shirt/top" and len(fid["class_histogram"]) == 10
    assert fid["fid_classifier"] > fid["fid_floor_classifier"] > 0
    for figure in ("samples", "reconstructions", "tsne", "robustness"):
        assert (root / f"figures/{figure}.png").is_file(), figure
    # Its own registered model; the run names the dataset and logs it as an MLflow input.
    assert rows(root, "select name, version from model_versions") == [
        ("bam-vae-fashion-mnist-cnn", 1)
    ]
    assert ("dataset", "fashion-mnist") in rows(root, "select key, value from tags")
    inputs = {name for (name,) in rows(root, "select name from datasets")}
    assert inputs == {"fashion-mnist-train", "fashion-mnist-test"}

    with bam_serve("models:/bam-vae-fashion-mnist-cnn/1", root) as port:
        served = served_images(port, n=64, seed=0)
    np.testing.assert_allclose(served, np.load(root / "data/generated/images.npy"), atol=1e-6)

    # The user's own images: a folder of class folders (RGB, 32x32), versioned by DVC.
    own = root / "data/shapes"
    rng = np.random.default_rng(0)
    for c in ("bars", "dots", "rings"):
        (own / c).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(own / c / f"{i:02d}.png")
    run(["dvc", "add", "data/shapes"], root)
    run(["git", "add", "data/shapes.dvc", "data/.gitignore"], root)
    run(["git", "commit", "-qm", "shapes"], root)
    out = run(["dvc", "exp", "run", "-S", "data.dataset=images", "-S", "data.path=data/shapes",
               "-S", "model.arch=cvae", "-S", "train.train_fraction=1.0",
               "-S", "evaluator.epochs=1", "-S", "generate.gmm.components=5"], root)  # fmt: skip
    assert "Running stage 'prepare-mnist'" in out
    data = json.loads((root / "metrics/data.json").read_text())
    assert data["dataset"] == "shapes" and data["classes"] == ["bars", "dots", "rings"]
    assert (
        data["conversion"]["resized"] == 120 and data["conversion"]["converted_to_grayscale"] == 120
    )
    assert data["test"]["count"] == 12  # 10 % of each class, seeded
    fid = json.loads((root / "metrics/fid.json").read_text())
    assert fid["classes"] == ["bars", "dots", "rings"] and "label_accuracy" in fid
    names = {name for (name,) in rows(root, "select name from registered_models")}
    assert names == {"bam-vae-fashion-mnist-cnn", "bam-vae-shapes-cvae"}

    # A change to the user's files re-runs prepare-mnist and everything after it.
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(own / "bars" / "00.png")
    status = run(["dvc", "status", "prepare-mnist"], root)
    assert re.search(r"changed deps:.*data/shapes", status, re.S) or "data/shapes" in status
