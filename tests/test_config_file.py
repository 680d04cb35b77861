"""`--config FILE`: every command reads option values from a YAML or JSON file; the command line wins."""

from __future__ import annotations

import json
from typing import Any

import typer
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own click)
            found += _commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


def test_every_command_takes_a_config_file():
    commands = _commands(typer.main.get_command(app))
    assert len(commands) >= 12
    for path, command in commands:
        assert any("--config" in p.opts for p in command.params), " ".join(path)


def test_file_values_are_defaults_and_the_command_line_wins(lt_cache, tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text(f"cache: {lt_cache.path}\nout: {tmp_path / 'a'}\nlr: 0.5\nbatch-size: 64\nepochs: 2\n")
    r = runner.invoke(app, ["fit-adapter", "--config", str(config), "--lr", "0.05", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["config"]["lr"] == 0.05  # the command line
    assert meta["config"]["batch_size"] == 64 and meta["config"]["epochs"] == 2  # the file, `batch-size` spelled


def test_a_list_is_a_comma_separated_value(lt_cache, tmp_path):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"cache": str(lt_cache.path), "ratio": [0.1, 0.4], "epochs": 1, "batch_size": 64}))
    r = runner.invoke(app, ["sweep", "--config", str(config), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    points = json.loads((tmp_path / "s" / "results.json").read_text())["points"]
    assert sorted(p["config"]["ratio"] for p in points) == [0.1, 0.4]


def test_an_unknown_key_names_itself_and_the_known_keys(lt_cache, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("cache: x\nratoi: 0.3\n")
    r = runner.invoke(app, ["fit-adapter", "--config", str(config), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "unknown key 'ratoi'" in text and "keys are cache, out, ratio," in text
    assert not (tmp_path / "a").exists()
    for body, words in (("- 1\n- 2\n", "holds no mapping"), ("a: [\n", "cannot read")):
        config.write_text(body)
        r = runner.invoke(app, ["fit-adapter", "--config", str(config)])
        assert r.exit_code == 2 and words in " ".join(r.output.split())
    r = runner.invoke(app, ["fit-adapter", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "cannot read" in " ".join(r.output.split())
