"""Config fields that carry their own facts: default, help, range and choices, written once.

Every config dataclass of the library declares its fields with `option(...)`. The metadata is what the CLI builds
its options from (`cli/generate.py`), and what `check_options` validates in each config's `__post_init__`, so every
command that builds a config, and every point of a sweep, gets the same checks.

    @dataclass
    class AdapterConfig:
        ratio: float = option(0.2, "Residual mix: ratio * W f + (1 - ratio) * f.", min=0.0, max=1.0)
        sampler: str = option("class-aware", "Index stream.", choices=SAMPLERS)
"""

from __future__ import annotations

import functools
import math
import os
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any

from .registry import Registry

# 50 megapixels: above any camera photo (a 6000x4000 frame is 24 MP); decoding one costs about 150 MB. PIL's own
# bomb limit (89 MP, an error past 179 MP) lets a single crafted image cost seconds and hundreds of MB per worker.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_HELP = "Pixel budget per image: an image declaring more is a bad image (see --skip-bad)."
OVERWRITE_HELP = "Redo the work --out already holds instead of refusing (or resuming)."


class OptionError(ValueError):
    """A config field's value is refused; `field` names it (the CLI shows it as its flag, `--field-name`). Other
    fields named in `message` are written with `errors.setting`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: Registry[Any] | Collection[str] | None = None,
    flag: str | None = None,
    axis: bool = True,
    cli: bool = True,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A dataclass field with its option facts in `metadata`.

    Args:
        default: the default value (official where there is an official one); none: a required field (a required
            option in the CLI).
        help: one sentence for `--help`; say what the official value is where it differs from the default.
        min: smallest allowed value (inclusive).
        max: largest allowed value (inclusive).
        above: the value must be strictly greater than this.
        choices: a registry (checked at build time, so late registrations count) or a fixed set of strings.
        flag: the CLI spelling when it is not `--field-name` (e.g. `--keep-last-batch/--drop-last-batch`).
        axis: whether a sweep may take a comma-separated list of values for this field.
        cli: whether commands expose the field as an option at all.
        default_factory: a callable making the default (mutually exclusive with `default`).
    """
    meta = {"help": help, "min": min, "max": max, "above": above, "choices": choices, "flag": flag, "axis": axis}
    meta["cli"] = cli
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's resolved annotations, once per class (resolving them costs far more than checking a value)."""
    return typing.get_type_hints(cls)


def field_type(cls: type, f: Field[Any]) -> tuple[type, bool]:
    """The base type of a config field and whether it may be None (`float | None` -> (float, True))."""
    hint = _type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = [a for a in args if a is not type(None)]
        return base[0], True
    if typing.get_origin(hint) is tuple:
        return tuple, False
    return hint, False


def choice_names(choices: Registry[Any] | Collection[str]) -> list[str]:
    """The names a `choices` spec allows, now."""
    return choices.names() if isinstance(choices, Registry) else list(choices)


def check_options(config: Any) -> None:
    """Check every `option` field of a config: its type, finite numbers, ranges and choices.

    Ints given as floats with an integral value and ints given for floats are converted in place (configs read back
    from JSON).

    Raises:
        OptionError: the first field that fails (`lr must be >= 0, got -1.0`).
    """
    cls = type(config)
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        value = getattr(config, f.name)
        base, optional = field_type(cls, f)
        name = f.name
        if value is None:
            if not optional:
                raise OptionError(name, "is required")
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif base is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif base is tuple and isinstance(value, list):
            value = tuple(value)
        elif base is Path and isinstance(value, str):
            value = Path(value)
        ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
        if not ok:
            raise OptionError(name, f"must be {base.__name__}, got {value!r}")
        setattr(config, name, value)
        meta = f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(name, f"must be a finite number, got {value}")
        if meta["min"] is not None and value < meta["min"]:
            raise OptionError(name, f"must be >= {meta['min']:g}, got {value:g}")
        if meta["above"] is not None and value <= meta["above"]:
            raise OptionError(name, f"must be > {meta['above']:g}, got {value:g}")
        if meta["max"] is not None and value > meta["max"]:
            raise OptionError(name, f"must be <= {meta['max']:g}, got {value:g}")
        if meta["choices"] is not None:
            known = choice_names(meta["choices"])
            for v in value if isinstance(value, tuple) else (value,):
                if v not in known:
                    raise OptionError(name, f"'{v}' is unknown; known: {', '.join(known)}")


def default_workers() -> int:
    """DataLoader workers for this machine: all cores but one, at most 16 per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(0, min(16, cores // world - 1))
