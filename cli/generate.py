"""Commands generated from config dataclasses: each option's name, default, help and choices come from its field.

`@config_command(app, config=AdapterConfig)` turns every `option(...)` field of `AdapterConfig` into a `--field-name`
option of the command and hands the function a built (hence validated) `config`; `grid=` does the same with
comma-separated values for a sweep. A field without a default is a required option. A value the config refuses exits 2
naming the option. Every option of a command comes from a field: the common ones (`--data`, `--model`, `--out`, ...)
from the small configs of `ballad_cache.pipelines.configs` (`ModelSource`, `RunOutput`, `Placement`, ...).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from ballad_cache.options import OptionError, choice_names, field_type

from .flags import as_flags, field_flag, flag, note_flags
from .ui import handle_errors

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _help(f: Field[Any], grid: bool) -> str:
    meta = f.metadata
    text = meta["help"]
    if meta["choices"] is not None:
        choices = meta["choices"]
        described = choices.describe() if hasattr(choices, "describe") else ", ".join(choice_names(choices))
        text += f" Choices: {described}."
    if grid and meta["axis"]:
        text += " Comma-separated values: each is a point of the grid."
    return text


def _option(cls: type, f: Field[Any], grid: bool) -> tuple[Any, Any]:
    """The (annotation, default) of one field's option; a field with neither default nor factory is required
    (`inspect.Parameter.empty`: typer then refuses a command line without it, exit 2)."""
    base, optional = field_type(cls, f)
    meta = f.metadata
    required = f.default is MISSING and f.default_factory is MISSING
    default = None if f.default is MISSING else f.default
    listed = base is tuple or (grid and meta["axis"] and base is not bool)
    if listed:
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        default = None if default in ("", None) else str(default)
    kind: Any = str if listed else base
    metavar = "|".join(choice_names(meta["choices"])) if meta["choices"] is not None and not listed else None
    info = typer.Option(
        field_flag(f),
        help=_help(f, grid),
        metavar=metavar,
        show_default=default is not None,
        rich_help_panel=panel(cls),
    )
    if required:
        return Annotated[kind, info], inspect.Parameter.empty
    return Annotated[kind | None if default is None else kind, info], default


def _cast(cls: type, name: str, text: str) -> Any:
    base, _ = field_type(cls, next(f for f in fields(cls) if f.name == name))
    base = str if base is tuple else base
    try:
        return base(text)
    except ValueError:
        raise typer.BadParameter(
            f"'{text}' is not {'an' if base.__name__[0] in 'aeiou' else 'a'} {base.__name__}",
            param_hint=flag(name),
        ) from None


def split_values(cls: type, name: str, value: str) -> list[Any]:
    """A comma-separated option value as a list of the field's type (an empty list is a usage error)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter("give comma-separated values", param_hint=flag(name))
    return [_cast(cls, name, v) for v in items]


def build(make: Callable[[], T]) -> T:
    """Build a config (or a grid of them); a value it refuses is a usage error (exit 2)."""
    try:
        return make()
    except OptionError as exc:
        raise typer.BadParameter(as_flags(exc.message), param_hint=flag(exc.field)) from None
    except ValueError as exc:
        raise typer.BadParameter(as_flags(str(exc))) from None


# the help section of each config class's options; a class not listed gets its own name
PANELS = {
    "FinetuneConfig": "Phase A",
    "AdapterConfig": "Head (phase B)",
    "SweepConfig": "Sweep",
    "ExtractConfig": "Extraction",
    "EvalConfig": "Evaluation",
    "PredictConfig": "Prediction",
    "DemoConfig": "Demo",
    "ReproduceConfig": "Reproduce",
    "RecipeData": "Data",
    "ModelSource": "Model",
    "DatasetSource": "Data",
    "CacheSource": "Cache",
    "Placement": "Device",
    "InfoFormat": "Output",
    "Reporting": "Reporting",
}


def panel(cls: type) -> str:
    """The `--help` section a config class's options are listed under (outputs and files: "Files")."""
    return PANELS.get(cls.__name__, "Files")


class PanelCommand(TyperCommand):
    """A command whose `--help` lists its options in one section per config class ("Phase A", "Model", "Files",
    ...), in click's plain layout, whose help column keeps half of an 80-column terminal."""

    def get_short_help_str(self, limit: int = 45) -> str:
        """The command's first sentence, whole (the commands list wraps it instead of cutting it with "...")."""
        first = " ".join((self.help or "").split("\n\n")[0].split())
        return first.split(". ")[0].rstrip(".") if first else super().get_short_help_str(limit)

    def format_options(self, ctx: Any, formatter: Any) -> None:  # typer's own click Context and HelpFormatter
        """Arguments, then one section of options per panel, in the order the panels first appear."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None)
            sections.setdefault(name or "Options", []).append(record)
        for name in sorted(sections, key=lambda n: n != "Arguments"):  # the arguments first, then by first use
            records = sections[name]
            with formatter.section(name):
                formatter.write_dl(records)


def config_values(path: Path, known: list[str]) -> dict[str, Any]:
    """The option values of a `--config` file (YAML or JSON: a mapping of option names, `lora_rank` or
    `lora-rank`, to values; a list is a comma-separated value), keyed by parameter name.

    Raises:
        typer.BadParameter: an unreadable file, no mapping, or a key that is no option of the command (naming it and
            the known keys).
    """
    import yaml

    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:300]
        raise typer.BadParameter(f"cannot read {path}: {reason}", param_hint="'--config'") from None
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise typer.BadParameter(f"{path} holds no mapping of option names to values", param_hint="'--config'")
    values: dict[str, Any] = {}
    for key, value in body.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in known:
            listed = ", ".join(k.replace("_", "-") for k in known)
            raise typer.BadParameter(
                f"{path}: unknown key '{key}'; this command's keys are {listed}", param_hint="'--config'"
            )
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        values[name] = value
    return values


def load_config(ctx: Any, param: Any, value: Path | None) -> Path | None:
    """`--config FILE` (eager, so it runs before the other options are read): its values become the command's
    defaults (click's `default_map`), so an option given on the command line wins and a required one may come from
    the file."""
    if value is not None:
        known = [p.name for p in ctx.command.params if p.name and p.name not in (param.name, "help")]
        ctx.default_map = {**(ctx.default_map or {}), **config_values(value, known)}
    return value


CONFIG_PARAMETER = inspect.Parameter(
    "config_file",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A YAML or JSON file of option values (keys as the options, `lr: 0.01`; lists for comma-separated "
            "values); options given on the command line win, an unknown key is an error.",
            is_eager=True,
            callback=load_config,
            rich_help_panel="Files",
            metavar="FILE",
        ),
    ],
)


def config_command(app: typer.Typer, name: str | None = None, **configs: type) -> Callable[[F], F]:
    """Register `fn` as a command whose options include every field of each config class.

    Args:
        app: the typer app.
        name: the command's name (default: the function's, dashed).
        configs: `argument=ConfigClass`: `fn` receives `argument` as a built config. Prefix the argument with
            `grid_` (`grid_configs=AdapterConfig`) to receive instead `{field: [values]}` of comma-separated lists.
            A field that several of the classes have (`overwrite`) is one option, its help the first class's, and
            its value goes to each of them.
    """

    def register(fn: F) -> F:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.name not in configs]
        options: dict[str, inspect.Parameter] = {}
        for arg, cls in configs.items():
            note_flags(cls)
            for f in fields(cls):
                if "help" in f.metadata and f.metadata["cli"] and f.name not in sig.parameters:
                    if f.name not in options:
                        annotation, default = _option(cls, f, arg.startswith("grid_"))
                        kind = inspect.Parameter.KEYWORD_ONLY
                        options[f.name] = inspect.Parameter(f.name, kind, default=default, annotation=annotation)
        # required options first: typer lists them first in --help, as a signature without defaults would
        params += sorted(options.values(), key=lambda p: p.default is not inspect.Parameter.empty)
        params.append(CONFIG_PARAMETER)

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            kwargs.pop(CONFIG_PARAMETER.name, None)  # its values are the options' defaults already (`load_config`)
            values = {k: kwargs.pop(k) for k in options}
            for arg, cls in configs.items():
                given = {f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None}
                if arg.startswith("grid_"):
                    kwargs[arg] = {k: split_values(cls, k, v) if isinstance(v, str) else [v] for k, v in given.items()}
                else:
                    given = {
                        k: tuple(split_values(cls, k, v)) if field_type(cls, _field(cls, k))[0] is tuple else v
                        for k, v in given.items()
                    }
                    kwargs[arg] = build(functools.partial(cls, **given))
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the generated signature, not fn's
        app.command(name, cls=PanelCommand)(handle_errors(wrapper))
        return fn

    return register


def _field(cls: type, name: str) -> Field[Any]:
    return next(f for f in fields(cls) if f.name == name)
