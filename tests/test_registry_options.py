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
