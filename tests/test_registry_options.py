"""Registries (ballad_cache.registry), option fields (ballad_cache.options) and the CLI generated from them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from ballad_cache.options import OptionError, check_options, option
from ballad_cache.registry import Registry
from cli.generate import config_command

COLOURS: Registry[int] = Registry("colour")
COLOURS.register("red", 1, help="warm")


@COLOURS.register("blue", help="cold")
def _blue() -> int:
    return 2


@dataclass
class ToyConfig:
    """A config as every command's: fields with their option facts."""

    rate: float = option(0.5, "A rate.", min=0.0, max=1.0)
    count: int = option(3, "A count.", min=1)
    colour: str = option("red", "A colour.", choices=COLOURS)
    scale: float | None = option(None, "An optional scale.", above=0.0)
    flag: bool = option(False, "A flag.")

    def __post_init__(self) -> None:
        check_options(self)


def test_registry_lists_gets_and_refuses():
    assert COLOURS.names() == ["red", "blue"] and COLOURS.get("blue") is _blue
    assert COLOURS.describe() == "red: warm; blue: cold"
    with pytest.raises(ValueError, match="unknown colour 'green'; known: red, blue"):
        COLOURS.get("green")
    with pytest.raises(ValueError, match="already registered"):
        COLOURS.register("red", 3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rate": 1.5}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"count": 0}, "count"),
        ({"count": 2.5}, "count"),
        ({"colour": "green"}, "colour"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("inf")}, "scale"),
    ],
)
def test_check_options_names_the_field(kwargs, field):
    with pytest.raises(OptionError) as info:
        ToyConfig(**kwargs)
    assert info.value.field == field


def test_late_registrations_count_and_json_ints_become_floats():
    COLOURS.register("green", 3)
    try:
        assert ToyConfig(colour="green", rate=1).rate == 1.0 and isinstance(ToyConfig(rate=1).rate, float)
    finally:
        COLOURS.unregister("green")


def test_generated_command_takes_every_field_and_exits_2_naming_the_option():
    app = typer.Typer()
    seen: list[ToyConfig] = []

    @config_command(app, "toy", config=ToyConfig)
    def toy(config: ToyConfig) -> None:
        seen.append(config)

    @config_command(app, "grid", grid_axes=ToyConfig)
    def grid(grid_axes: dict) -> None:
        seen.append(grid_axes)  # type: ignore[arg-type]

    runner = CliRunner()
    r = runner.invoke(app, ["toy", "--rate", "0.25", "--colour", "blue", "--flag"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == ToyConfig(rate=0.25, colour="blue", flag=True)
    r = runner.invoke(app, ["toy", "--count", "0"])
    assert r.exit_code == 2 and "--count" in r.output
    r = runner.invoke(app, ["grid", "--rate", "0.1,0.2", "--colour", "red,blue"])
    assert r.exit_code == 0, r.output
    assert seen[-1]["rate"] == [0.1, 0.2] and seen[-1]["colour"] == ["red", "blue"] and seen[-1]["count"] == [3]
    r = runner.invoke(app, ["toy", "--help"])
    assert "red: warm; blue: cold" in r.output and "0.5" in r.output


@dataclass
class ToyTarget:
    """A config with a required field and a field ToyConfig has too."""

    out: str = option(help="Where.")
    flag: bool = option(False, "Also a flag.")

    def __post_init__(self) -> None:
        check_options(self)


def test_a_field_without_default_is_a_required_option_and_a_shared_field_is_one_option():
    app = typer.Typer()
    seen: list[tuple[ToyConfig, ToyTarget]] = []

    @config_command(app, "toy", config=ToyConfig, target=ToyTarget)
    def toy(config: ToyConfig, target: ToyTarget) -> None:
        seen.append((config, target))

    @config_command(app, "other")
    def other() -> None:
        pass

    runner = CliRunner()
    r = runner.invoke(app, ["toy", "--rate", "0.25"])
    assert r.exit_code == 2 and "Missing option '--out'" in r.output and not seen
    r = runner.invoke(app, ["toy", "--out", "x", "--flag"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == (ToyConfig(flag=True), ToyTarget(out="x", flag=True))  # one --flag, given to both
    r = runner.invoke(app, ["toy", "--out", "x"])
    assert seen[-1] == (ToyConfig(flag=False), ToyTarget(out="x", flag=False))


def test_library_messages_name_fields_and_the_cli_prints_their_flags():
    """Catches a setting printed as the field name in the CLI (or as a flag to a library user), a lone flag given an
    off spelling it does not have, and a backticked word that is no field being rewritten."""
    from ballad_cache.errors import setting
    from cli.flags import as_flags
    from cli.main import app  # noqa: F401  (records every command's fields)

    message = (
        f"pass {setting('skip_bad', True)} or {setting('keep_last_batch', False)}; use {setting('epochs', 2)} with "
        f"{setting('splits', ('train', 'val'))}, {setting('pretrained', '/w.pt')} and a lower {setting('lr')}; "
        "run `ballad cache verify` or `ballad`"
    )
    assert message == (
        "pass `skip_bad=True` or `keep_last_batch=False`; use `epochs=2` with `splits=('train', 'val')`, "
        "`pretrained='/w.pt'` and a lower `lr`; run `ballad cache verify` or `ballad`"
    )
    assert as_flags(message) == (
        "pass --skip-bad or --drop-last-batch; use --epochs 2 with --splits train,val, --pretrained /w.pt and a lower "
        "--lr; run `ballad cache verify` or `ballad`"
    )
    assert as_flags(setting("skip_bad", False)) == "no --skip-bad"
    with pytest.raises(ValueError, match="not a config field"):
        setting("--skip-bad")


def _library_settings() -> set[str]:
    """Every field the library names with `setting("field", ...)` (a literal first argument)."""
    import ast
    from pathlib import Path

    names = set()
    for path in (Path(__file__).resolve().parents[1] / "ballad_cache").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
    return names


def test_every_option_is_a_config_field_and_every_setting_the_library_names_has_a_flag():
    """Catches a hand-written option in cli/main.py (its flag not taken from a field) and a library message naming a
    field no command exposes (the CLI would print it as the bare field name)."""
    from typer.main import get_command

    from cli.flags import FLAGS
    from cli.generate import CONFIG_PARAMETER
    from cli.main import app

    def commands(group, path=""):
        for name, command in group.commands.items():
            yield from commands(command, f"{path} {name}") if hasattr(command, "commands") else [(path + name, command)]

    seen = set()
    for name, command in commands(get_command(app)):
        for param in command.params:
            # --config (generate.CONFIG_PARAMETER) is the one option config_command gives every command: it reads
            # the generated options' values from a file
            if param.param_type_name != "option" or param.name in ("help", CONFIG_PARAMETER.name):
                continue
            assert param.name in FLAGS, f"{name}: --{param.name} is not generated from a config field"
            assert param.opts[0] == FLAGS[param.name].split("/")[0], (name, param.opts)
            seen.add(param.name)
    assert {"data", "model", "pretrained", "device", "out", "cache", "adapter", "resume", "overwrite"} <= seen
    import ast
    from pathlib import Path

    main = ast.parse((Path(__file__).resolve().parents[1] / "cli" / "main.py").read_text())
    written = [
        (fn.name, node.lineno)
        for fn in main.body
        if isinstance(fn, ast.FunctionDef) and fn.name != "main_callback"  # the global --debug
        for node in ast.walk(fn)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option"
    ]
    assert not written, f"options written by hand in cli/main.py: {written}"
    named = _library_settings()
    assert len(named) > 20 and named <= set(FLAGS), f"no flag for {sorted(named - set(FLAGS))}"


def test_split_has_choices():
    from cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", "--cache", "nowhere", "--split", "tset"])
    assert r.exit_code == 2 and "--split" in r.output and "'tset' is unknown; known: train, val, test" in r.output


def test_help_fits_an_80_column_terminal_in_named_sections():
    """Every command's --help at 80 columns: no line wider, every option's description starting by column 40 (so
    it has at least 40 columns), options grouped by what they set, and `sweep --help` under 200 lines."""
    from cli.main import app

    commands = ["finetune", "extract-features", "fit-adapter", "evaluate", "sweep", "export", "predict", "demo"]
    for command in [[], *([c] for c in commands), ["cache", "info"], ["data", "info"], ["models"]]:
        r = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert max(map(len, lines)) <= 80, command
        for line in lines:
            if line.startswith("  --") and "  " in line.strip():  # an option and its description on one line
                assert len(line) - len(line.split("  ", 2)[-1].lstrip()) <= 40, line
        if command == []:  # the commands list wraps each summary rather than cutting it
            assert "..." not in r.output.split("Commands:")[1], r.output
        if command == ["sweep"]:
            assert len(lines) < 200
        if command == ["finetune"]:
            sections = [x for x in lines if x.endswith(":") and not x.startswith(" ")]
            assert {"Phase A:", "Model:", "Data:", "Files:", "Device:"} <= set(sections), sections
