"""``data.dataset: images``: a folder of the user's image files (``data.path``).

Layouts, found in this order:

1. ``train/<class>/*`` and ``test/<class>/*``: the splits as given (same class folders);
2. ``<class>/*``: each class split by a seeded rule: ``data.test_fraction`` of its files
   (at least one) after shuffling their sorted names with ``data.split_seed`` go to test;
3. image files directly in the folder: no classes (unlabelled), split the same way.

Classes are the subfolder names in sorted order. Files: ``.png``, ``.jpg``, ``.jpeg``,
``.bmp``, ``.gif``, ``.webp`` (case-insensitive). Each is read with PIL: refused, by name,
if its header claims more than :data:`MAX_PIXELS` pixels (checked before decoding: a
decompression bomb); its first frame if animated; turned upright by its EXIF orientation
(``ImageOps.exif_transpose``); composited on white if it has transparency (what an image
viewer shows); converted to 8-bit grayscale (``convert("L")``: ITU-R 601-2 luma; 16-bit
grayscale scaled from 0..65535) and, unless already 28 x 28, resized to 28 x 28 with Lanczos
(antialiased; the aspect ratio is not kept); ``data.resize: false`` refuses other sizes
instead. The counts of each conversion are recorded in ``metrics/data.json``. Other files (a
README, labels.csv) are ignored; an image name that cannot be read (a broken or looping
symbolic link, no read permission) is refused in one line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bam_vae.config import DataConfig
from bam_vae.datasets.base import SIZE, Prepared, Split, check, user_path
from bam_vae.errors import BamError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
RULE = (
    "first frame, EXIF orientation applied, transparency composited on white, PIL convert('L')"
    " (ITU-R 601-2 luma), then resize to 28x28 with Lanczos (antialiased)"
)
# A 28 x 28 dataset needs no bigger source: 50 M pixels is an 8000 x 6000 camera image, and
# stays under Pillow's own bomb limits (89 M warns and decodes, 179 M refuses).
MAX_PIXELS = 50_000_000


def _files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted; one that cannot be read (a broken or looping
    symbolic link, no read permission) is one line naming it, never silently left out."""
    import errno
    import os
    import stat

    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES:
            continue
        try:
            mode = path.stat().st_mode  # follows links
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                why = "a symbolic link loop"
            elif path.is_symlink():
                why = f"a broken symbolic link (to {os.readlink(path)})"
            else:
                why = exc.strerror or type(exc).__name__
            raise BamError(f"{path}: cannot be read: {why}; expected an image file (fix or"
                           " remove it)") from None  # fmt: skip
        if stat.S_ISDIR(mode):
            continue
        if not os.access(path, os.R_OK):
            raise BamError(f"{path}: cannot be read: permission denied; expected a readable"
                           " image file (chmod +r, or remove it)")  # fmt: skip
        found.append(path)
    return found


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _Reader:
    """Reads images one by one, counting what it converted."""

    def __init__(self, resize: bool):
        self.resize = resize
        self.grayscale = self.resized = self.rotated = self.transparent = self.animated = 0

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > MAX_PIXELS:
                    raise _too_big(path, f"{width}x{height} = {width * height:,}")
                self.animated += getattr(img, "n_frames", 1) > 1
                img.seek(0)
                img.load()  # decode now: a truncated file fails here, not later
                upright = img
                if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # a phone's photo
                    upright = ImageOps.exif_transpose(img)
                    self.rotated += 1
                mode, size = upright.mode, upright.size
                flat = _on_white(upright)
                self.transparent += flat is not upright
                gray = _gray8(flat)
        except Image.DecompressionBombError as exc:  # Pillow refuses before we see the size
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(claimed[1]):,}" if claimed else "over 178,956,970"
            raise _too_big(path, size) from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise BamError(
                f"{path}: not a readable image ({exc}); expected an image file PIL reads"
                f" ({', '.join(sorted(s[1:] for s in SUFFIXES))})"
            ) from None
        self.grayscale += mode not in ("L", "1")
        if size != (SIZE, SIZE):
            if not self.resize:
                raise BamError(
                    f"{path}: {size[0]}x{size[1]} pixels with data.resize=false; expected"
                    f" {SIZE}x{SIZE} (or data.resize=true)"
                )
            gray = gray.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            self.resized += 1
        return np.asarray(gray, dtype=np.uint8)


def _too_big(path: Path, size: str) -> BamError:
    return BamError(
        f"{path}: {size} pixels is over the limit of {MAX_PIXELS:,} pixels an image may have"
        " (a decompression bomb, or a needlessly large source); expected a smaller image"
    )


def _on_white(img):
    """``img`` composited on white if it has transparency (an alpha channel, or a palette's
    or grayscale's transparent colour); else ``img`` itself."""
    from PIL import Image

    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def _gray8(img):
    """8-bit grayscale. 16-bit and 32-bit grayscale (``I;16``, ``I``) are scaled from their
    full range (0..65535) to 0..255: PIL's ``convert("L")`` would clip them at 255."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.rint(np.clip(wide, 0, 65535) * (255 / 65535)).astype(np.uint8))
    return img.convert("L")


def _split_rule(files: list[Path], fraction: float, seed: int, what: str) -> tuple[list, list]:
    if len(files) < 2:
        raise BamError(
            f"{what}: {len(files)} image(s); expected at least 2 to split into train/test"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    n_test = max(1, round(fraction * len(files)))
    test = sorted(files[i] for i in order[:n_test])
    return sorted(files[i] for i in order[n_test:]), test


def _read_split(read: _Reader, groups: list[list[Path]]) -> Split:
    images = [read(p) for group in groups for p in group]
    labels = [c for c, group in enumerate(groups) for _ in group]
    empty = np.zeros((0, SIZE, SIZE), np.uint8)
    return Split(np.stack(images) if images else empty, np.asarray(labels, dtype=np.int64))


def load_images(cfg: DataConfig, name: str) -> Prepared:
    root = user_path(cfg, folder=True, expected="a folder of images")
    read = _Reader(cfg.resize)
    split = {"test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed}
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in _subfolders(root / "train")]
        test_classes = [p.name for p in _subfolders(root / "test")]
        if classes != test_classes:
            raise BamError(
                f"{root}: class folders differ, train {classes} vs test {test_classes};"
                " expected the same classes in both"
            )
        groups = {s: [_files(root / s / c) for c in classes] for s in ("train", "test")}
        for s, per_class in groups.items():
            for c, files in zip(classes, per_class, strict=True):
                if not files:
                    raise BamError(f"{root / s / c}: no images; expected at least one per class")
        layout, split = "train/<class>, test/<class>", None
    elif _subfolders(root):
        classes = [p.name for p in _subfolders(root)]
        pairs = [_split_rule(_files(root / c), cfg.test_fraction, cfg.split_seed, str(root / c))
                 for c in classes]  # fmt: skip
        groups = {"train": [p[0] for p in pairs], "test": [p[1] for p in pairs]}
        layout = "<class> folders, split by data.test_fraction and data.split_seed"
    else:
        classes = []
        train, test = _split_rule(_files(root), cfg.test_fraction, cfg.split_seed, str(root))
        groups = {"train": [train], "test": [test]}
        layout = "images without classes, split by data.test_fraction and data.split_seed"
    n_files = sum(len(g) for s in groups.values() for g in s)
    print(f"prepare: reading {n_files} images from {root} ({layout})")
    train, test = _read_split(read, groups["train"]), _read_split(read, groups["test"])
    extra = {
        "layout": layout,
        "split_rule": split,
        "conversion": {
            "rule": RULE,
            "converted_to_grayscale": read.grayscale,
            "resized": read.resized,
            "exif_rotated": read.rotated,
            "transparency_on_white": read.transparent,
            "animated_first_frame": read.animated,
            "images": n_files,
        },  # fmt: skip
    }
    data = Prepared(name, tuple(classes), train, test, source=f"images:{root}",
                    labelled=bool(classes), extra=extra)  # fmt: skip
    check(data)
    return data
