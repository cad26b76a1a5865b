"""A sweep's grid (``-S KEY=V1,V2`` options, their points and labels) and its names."""

from __future__ import annotations

import itertools
import re
import time

from bam_vae.errors import BamError

Point = tuple[tuple[str, str], ...]  # one grid point: (key, value) pairs, in the options' order

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
KEY_RE = re.compile(r"^(?:[\w./-]+:)?[A-Za-z_][\w-]*(?:\.[\w-]+)*$")
HYDRA_FUNCTIONS = ("range(", "choice(", "interval(", "glob(", "shuffle(", "sort(", "tag(")
# Params whose change retrains the model: points that share them run one after another.
TRAIN_KEYS = ("model.", "train.", "data.")


def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``['a', 'b', '[c,d]']``: commas inside brackets or quotes do not split
    (the grammar of ``dvc exp run -S``)."""
    values, stack, quote, start = [], [], "", 0
    closing = {"]": "[", "}": "{", ")": "("}
    for pos, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            stack.append(char)
        elif char in closing:
            if not stack or stack.pop() != closing[char]:
                raise BamError(f"unbalanced {char!r} at position {pos + 1}")
        elif char == "," and not stack:
            values.append(text[start:pos].strip())
            start = pos + 1
    if quote:
        raise BamError(f"unclosed quote {quote}")
    if stack:
        raise BamError(f"unclosed {stack[-1]!r}")
    values.append(text[start:].strip())
    return values


def parse_grid(options: list[str]) -> list[Point]:
    """``-S`` options -> grid points, the cartesian product across options, in their order.

    Each point is a tuple of ``(key, value)``. Any problem is one line naming the option."""
    if not options:
        raise BamError("no grid: give at least one -S KEY=V1,V2 (e.g. -S model.z_dim=2,16)")
    axes: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for option in options:
        if "=" not in option:
            raise BamError(f"-S {option!r}: expected KEY=V1,V2,..., e.g. -S model.z_dim=2,16")
        key, text = (part.strip() for part in option.split("=", 1))
        if not KEY_RE.match(key):
            raise BamError(f"-S {option!r}: {key!r} is not a param key; expected e.g. train.lr")
        if key in seen:
            raise BamError(f"-S {option!r}: {key} is given twice; put all its values in one -S")
        if key.split(":")[-1] == "train.sweep":
            raise BamError(f"-S {option!r}: bam sweep sets train.sweep itself (use --name)")
        seen.add(key)
        try:
            values = split_values(text)
        except BamError as exc:
            raise BamError(f"-S {option!r}: {exc}") from None
        if not all(values):
            raise BamError(f"-S {option!r}: empty value; expected KEY=V1,V2,... with no empty V")
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:  # the same trial twice, as a second point of the grid
            raise BamError(f"-S {option!r}: value {repeated} is given twice; list each once")
        for value in values:
            if value.startswith(HYDRA_FUNCTIONS):
                raise BamError(
                    f"-S {option!r}: {value.split('(')[0]}() sweeps are not supported;"
                    " list the values, e.g. -S train.lr=0.001,0.01"
                )
        axes.append([(key, value) for value in values])
    return list(itertools.product(*axes))


def label(point: Point) -> str:
    return " ".join(f"{key}={value}" for key, value in point)


def training_params(point: Point) -> Point:
    """The part of ``point`` that decides the trained model (model, train and data params)."""
    return tuple((k, v) for k, v in point if k.split(":")[-1].startswith(TRAIN_KEYS))


def default_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


def check_name(name: str) -> None:
    """A sweep's name names git refs (its experiments ``NAME-1..N``)."""
    if not NAME_RE.match(name) or name.endswith((".", ".lock")):
        raise BamError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names git refs),"
            " e.g. --name latent-z"
        )
