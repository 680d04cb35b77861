"""Each config field's flag, and library messages rewritten with them.

The library names a setting by its field (`` `skip_bad=True` ``, `ballad_cache.errors.setting`); the CLI knows each
field's flag from the field itself (`option(flag=...)`, else `--field-name`), recorded here as commands are generated,
and prints `--skip-bad` in its place.
"""

from __future__ import annotations

import ast
import re
from dataclasses import Field, fields
from typing import Any

from ballad_cache.errors import SETTING

FLAGS: dict[str, str] = {}  # config field -> its flag, as `option(flag=...)` spells it ("--keep-last-batch/--drop-...")


def field_flag(f: Field[Any]) -> str:
    """The flag of an option field: its `flag` metadata, else `--field-name`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def note_flags(cls: type) -> None:
    """Record the flag of every option field of the config class `cls` (the first class to name a field wins)."""
    for f in fields(cls):
        if "help" in f.metadata and f.metadata["cli"]:
            FLAGS.setdefault(f.name, field_flag(f))


def flag(field: str) -> str:
    """The flag that sets `field` (`--skip-bad`; the on-flag of a `--on/--off` pair); `--field-name` if unknown."""
    return FLAGS.get(field, "--" + field.replace("_", "-")).split("/")[0]


def _as_flag(match: re.Match[str]) -> str:
    name, text = match.group(1), match.group(2)
    if name not in FLAGS:
        return match.group(0)  # backticks around something else: a command, a file name
    on, _, off = FLAGS[name].partition("/")
    if text is None:
        return on
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return f"{on} {text}"
    if isinstance(value, bool):
        return on if value else off or f"no {on}"  # a lone flag (`--skip-bad`) has no off spelling
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"{on} {value}"


def as_flags(message: str) -> str:
    """`message` with every setting the library named (`` `skip_bad=True` ``) written as its flag (`--skip-bad`)."""
    return SETTING.sub(_as_flag, message)
