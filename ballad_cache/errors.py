"""The one exception type the library raises for problems a user can fix, and how its messages name a setting.

A message that tells the user to change a setting names the config field, written by `setting`: a library user
reads `` `skip_bad=True` ``, the name they pass; the CLI, which knows each field's flag, prints the same place as
`--skip-bad` (`cli/flags.py`). So the library never spells a flag, and a flag renamed in the CLI is renamed in every
message at once.
"""

from __future__ import annotations

import re

# a setting in a message: `name` or `name=value`, the value as Python writes it (`setting`)
SETTING = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")

Value = bool | int | float | str | tuple[str, ...]
_NO_VALUE = object()


class BalladError(Exception):
    """A problem with the user's input or environment, phrased as one line that names the file and the fix.

    The CLI prints the message and exits 1 without a traceback; anything else escaping the library is a bug.
    """


def setting(field: str, value: Value | object = _NO_VALUE) -> str:
    """A config field named in a message, as a library user writes it: `` `skip_bad=True` ``, or `` `lr` `` without
    a value. The CLI prints it as the field's flag (`--skip-bad`, `--lr`); `field` must be the name of a config field
    that some command exposes (a test checks every one the library names).

    Args:
        field: the config field (`skip_bad`, `pretrained`).
        value: the value the message suggests (`True`, `"none"`, `("train", "val")`), or nothing.
    """
    if not SETTING.fullmatch(f"`{field}`"):
        raise ValueError(f"'{field}' is not a config field name")
    return f"`{field}`" if value is _NO_VALUE else f"`{field}={value!r}`"
