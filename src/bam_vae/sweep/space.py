"""A sweep's search space: ``-S KEY=VALUES`` options in Hydra's override grammar (what
``dvc exp run -S`` and hydra-optuna-sweeper read), as Optuna distributions.

=====================================  ===============================================
``KEY=V``                              V in every trial
``KEY=V1,V2`` or ``choice(V1,V2)``     one of the values (a categorical)
``range(START,STOP[,STEP])``           START, START+STEP, ... below STOP (Python's range)
``interval(LOW,HIGH)``                 a float in [LOW, HIGH]
``tag(log, interval(LOW,HIGH))``       the same on a log scale (LOW > 0)
``tag(int, interval(LOW,HIGH))``       an integer in [LOW, HIGH] (``tag(int, log, ...)``)
=====================================  ===============================================

A space of choices and integer ranges only is a grid (:attr:`Space.grid`); intervals need a
sampler (TPE, random) and a number of trials. Every value a trial may get is checked against
the params schema before anything starts (:func:`check_values`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bam_vae.errors import BamError, reason

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
KEY_RE = re.compile(r"^(?:[\w./-]+:)?[A-Za-z_][\w-]*(?:\.[\w-]+)*$")
LABEL_KEY = "sweep.name"  # set by bam sweep on every trial (--name)


@dataclass(frozen=True)
class Space:
    """Parsed ``-S`` options: ``fixed`` values (their text, as given) and ``distributions``
    (``optuna.distributions.BaseDistribution`` per key), both in the options' order."""

    options: tuple[str, ...]
    fixed: dict[str, str]
    distributions: dict[str, Any]

    @property
    def grid(self) -> dict[str, list[Any]] | None:
        """Every value of every swept key (GridSampler's search space), or None if a key
        takes a continuous range."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        grid: dict[str, list[Any]] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                return None
        return grid

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in (self.grid or {}).values())

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """``KEY=TEXT`` for ``dvc exp run -S`` and ``--set``: the fixed keys, then ``values``."""
        return [f"{k}={v}" for k, v in self.fixed.items()] + [
            f"{k}={as_text(v)}" for k, v in values.items()
        ]


def as_text(value: Any) -> str:
    """A sampled value as ``-S`` text (YAML): ``true``, ``0.00123``, ``gaussian``."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def _distribution(option: str, value: Any) -> Any:
    """An Optuna distribution for one parsed Hydra sweep; BamError naming ``option``."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    def bad(why: str) -> BamError:
        return BamError(f"-S {option!r}: {why}")

    if isinstance(value, ChoiceSweep):
        choices = [v if v is None or isinstance(v, bool | int | float | str) else
                   _hydra_text(v) for v in value.list]  # fmt: skip
        repeated = next((v for i, v in enumerate(choices) if v in choices[:i]), None)
        if repeated is not None:
            raise bad(f"value {repeated} is given twice; list each once")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step <= 0 or not range_values(start, stop, step):
            raise bad(f"range({start}, {stop}, {step}) is empty; expected START < STOP, STEP > 0")
        values = range_values(start, stop, step)
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(values[0], values[-1], step=step)
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if not low < high:
            raise bad(f"interval({low:g}, {high:g}): expected LOW < HIGH")
        if log and low <= 0:
            raise bad(f"tag(log, interval({low:g}, {high:g})): a log scale needs LOW > 0")
        if "int" in value.tags:
            if math.ceil(low) > math.floor(high):
                raise bad(f"interval({low:g}, {high:g}) holds no integer")
            return IntDistribution(math.ceil(low), math.floor(high), log=log)
        return FloatDistribution(low, high, log=log)
    raise bad(f"{type(value).__name__} is not supported; expected V1,V2, choice(), range()"
              " or interval()")  # fmt: skip


def range_values(start: float, stop: float, step: float) -> list[Any]:
    """Python's ``range`` for ints; the same for floats (rounded to 12 digits)."""
    if all(isinstance(v, int) for v in (start, stop, step)):
        return list(range(start, stop, step))
    n = max(0, math.ceil((stop - start) / step)) if step > 0 else 0
    return [round(start + i * step, 12) for i in range(n)]


def _hydra_text(value: Any) -> str:
    """A non-scalar choice (a list, a dict) as ``-S`` text: ``[classifier,inception]``."""
    if isinstance(value, list):
        return "[" + ",".join(_hydra_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_text(v)}" for k, v in value.items()) + "}"
    return as_text(value)


def parse_space(options: list[str]) -> Space:
    """``-S`` options -> a :class:`Space`; any problem is one line naming the option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not options:
        raise BamError("no search space: give at least one -S KEY=V1,V2 or -S 'KEY=choice(...)'")
    parser = OverridesParser.create()
    fixed: dict[str, str] = {}
    distributions: dict[str, Any] = {}
    for option in options:
        if "=" not in option:
            raise BamError(f"-S {option!r}: expected KEY=VALUE(S), e.g. -S model.z_dim=2,16")
        key, text = (part.strip() for part in option.split("=", 1))
        if not KEY_RE.match(key):
            raise BamError(f"-S {option!r}: {key!r} is not a param key; expected e.g. train.lr")
        if key in fixed or key in distributions:
            raise BamError(f"-S {option!r}: {key} is given twice; put all its values in one -S")
        if key.split(":")[-1] == LABEL_KEY:
            raise BamError(f"-S {option!r}: bam sweep sets {LABEL_KEY} itself (use --name)")
        if not text:
            raise BamError(f"-S {option!r}: empty value; expected KEY=V or KEY=V1,V2,...")
        try:  # the key is ours to check: Hydra's key grammar has no file prefix
            override = parser.parse_overrides([f"k={text}"])[0]
        except Exception as exc:  # hydra's OverrideParseException: a multi-line message
            raise BamError(f"-S {option!r}: {reason(exc)}") from None
        if override.is_sweep_override():
            distributions[key] = _distribution(option, override.value())
        else:
            fixed[key] = text
    return Space(tuple(options), fixed, distributions)


def _candidates(dist: Any) -> list[Any]:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def check_values(space: Space, params_file: Path) -> None:
    """Every bound and choice of every key against the params schema (the same checks as
    ``bam <stage> --set``), with the fixed values and the others at their defaults or, for
    settings that go together (``train.noise_fraction`` needs ``train.noise_std``), one other
    swept key at one of its values: one line naming the option at the first value that is
    never valid. A combination that is not valid fails its trial alone. Keys of other params
    files (``file.yaml:key``) are left to DVC."""
    from bam_vae.config import ConfigError, load_params

    base = [f"{k}={v}" for k, v in space.fixed.items() if ":" not in k]
    try:
        load_params(params_file, base)
    except ConfigError as exc:
        raise BamError(f"-S {' -S '.join(base)}: {exc}") from None
    swept = {k: _candidates(d) for k, d in space.distributions.items() if ":" not in k}
    options = {o.split("=", 1)[0].strip(): o for o in space.options}
    for key, values in swept.items():
        others = [[]] + [[f"{k}={as_text(v)}"] for k, vs in swept.items() if k != key for v in vs]
        for value in values:
            first = None
            for other in others:
                try:
                    load_params(params_file, [*base, f"{key}={as_text(value)}", *other])
                    break
                except ConfigError as exc:
                    first = first or exc
            else:
                raise BamError(f"-S {options[key]!r}: {key}={as_text(value)}: {first}")


def default_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


def check_name(name: str) -> None:
    """A sweep's name names git refs (its experiments ``NAME-<trial>``) and the study."""
    if not NAME_RE.match(name) or name.endswith((".", ".lock")):
        raise BamError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names git refs),"
            " e.g. --name latent-z"
        )
