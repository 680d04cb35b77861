import json

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_tiny_demo_runs_the_whole_pipeline(ballad_data, tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--size", "tiny", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    assert [row["head"] for row in summary["rows"]] == ["zero-shot", "adapter", "adapter+LA"]
    assert summary["train_class_counts"] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    for row in summary["rows"]:
        assert 0.0 <= row["top1"] <= 100.0
    for step in (
        "finetune/model",
        "cache/manifest.json",
        "adapter/adapter.json",
        "sweep/results.csv",
        "evaluate/result.json",
        "report/per_class.png",
    ):
        assert (tmp_path / "demo" / step).exists(), step
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--size", "tiny", "--device", "cpu"])
    assert r.exit_code == 0 and "already done" in r.output  # a rerun reuses finished steps


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    for cmd in ("finetune", "extract-features", "fit-adapter", "evaluate", "sweep", "demo", "cache", "data"):
        assert cmd in r.output
    r = runner.invoke(app, ["cache", "--help"])
    assert "info" in r.output and "verify" in r.output
