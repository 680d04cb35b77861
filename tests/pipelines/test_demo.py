import json
import re

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


STEPS = ["finetune", "extract", "fit_adapter", "sweep", "evaluate", "export_predict"]
# each step's folder and the command whose config.json it holds
STEP_FOLDERS = {
    "finetune": "finetune",
    "cache": "extract-features",
    "adapter": "fit-adapter",
    "sweep": "sweep",
    "evaluate": "evaluate",
    "export": "export",
}
# results a rerun must reuse, not rewrite
RESULTS = [
    "finetune/model/open_clip_model.safetensors",
    "cache/train-00000.h5",
    "adapter/adapter.safetensors",
    "evaluate/result.json",
    "export/classifier.safetensors",
]


def _stamps(folder):
    """Bytes and modification time of each result file: equal only for a file not written again."""
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in RESULTS}


@pytest.mark.slow
def test_tiny_demo_runs_the_whole_pipeline(ballad_data, tmp_path):
    """Catches a rerun that redoes finished steps, a step folder without the config.json of what made it, and a
    demo with another model that reports itself over the first model's phase A, cache and adapter."""
    args = ["demo", "--out", str(tmp_path / "demo"), "--size", "tiny", "--model", "ballad-tiny", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    assert summary["model"] == "ballad-tiny" and summary["reused"] == []
    assert [row["head"] for row in summary["rows"]] == ["zero-shot", "adapter", "adapter+LA", "knn@10"]
    assert set(summary["seconds"]) == {"finetune", "extract", "fit_adapter", "sweep", "evaluate", "export_predict"}
    assert summary["train_class_counts"] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    # the adapter row, recomputed from the cache and the adapter files without ballad's evaluation code
    import h5py
    import numpy as np
    from safetensors.numpy import load_file

    demo = tmp_path / "demo"
    manifest = json.loads((demo / "cache" / "manifest.json").read_text())
    x = np.concatenate(
        [h5py.File(demo / "cache" / e["file"])["features"][()] for e in manifest["splits"]["test"]["shards"]]
    ).astype(np.float64)
    y = np.concatenate(
        [h5py.File(demo / "cache" / e["file"])["labels"][()] for e in manifest["splits"]["test"]["shards"]]
    )
    text = h5py.File(demo / "cache" / "text.h5")["class_embeddings"][()].astype(np.float64)
    w = load_file(str(demo / "adapter" / "adapter.safetensors"))["weight"].astype(np.float64)
    ratio = json.loads((demo / "adapter" / "adapter.json").read_text())["config"]["ratio"]
    h = ratio * x @ w.T + (1 - ratio) * x
    pred = (h / np.linalg.norm(h, axis=1, keepdims=True) @ text.T).argmax(1)
    per_class = np.array([(pred[y == c] == c).mean() for c in range(10)]) * 100
    counts = np.array(summary["train_class_counts"])
    adapter = summary["rows"][1]
    assert adapter["top1"] == pytest.approx(100 * (pred == y).mean(), abs=0.02)  # fp32 vs fp64 near-ties
    assert adapter["many"] == pytest.approx(per_class[counts > 100].mean(), abs=0.05)
    assert adapter["few"] == pytest.approx(per_class[counts < 20].mean(), abs=0.05)
    preds = summary["predictions"]
    assert len(preds) == 20 and [p["label_name"] for p in preds[::2]] == manifest["classnames"]
    assert all(p["correct"] == int(p["pred_name"] == p["label_name"]) for p in preds)
    meta = json.loads((demo / "adapter" / "adapter.json").read_text())
    assert meta["steps"] == 2 * (1236 // 128) and 0 <= meta["best_epoch"] <= 2
    for step in (
        "finetune/model",
        "cache/manifest.json",
        "adapter/adapter.json",
        "sweep/results.csv",
        "evaluate/result.json",
        "report/per_class.png",
        "report/predictions.png",
        "export/classifier.json",
    ):
        assert (tmp_path / "demo" / step).exists(), step
    for folder, command in STEP_FOLDERS.items():
        config = json.loads((demo / folder / "config.json").read_text())
        assert config["command"] == command, folder
    assert json.loads((demo / "finetune" / "config.json").read_text())["model"] == "ballad-tiny"
    assert json.loads((demo / "config.json").read_text())["config"]["model"] == "ballad-tiny"
    stamps = _stamps(demo)
    r = runner.invoke(app, args)  # a rerun reuses every finished step
    assert r.exit_code == 0, r.output
    again = json.loads((demo / "report" / "summary.json").read_text())
    assert again["reused"] == STEPS and again["rows"] == summary["rows"]
    assert _stamps(demo) == stamps
    # another model into the same folder: refused at the first step, naming the model both ways; nothing changes
    configs = {p: p.read_bytes() for p in demo.rglob("config.json")}
    r = runner.invoke(app, [*args[:-4], "--model", "ballad-lite", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    message = " ".join(r.output.split())  # the console wraps long lines
    assert "model 'ballad-tiny' -> 'ballad-lite'" in message and "--overwrite" in message
    assert _stamps(demo) == stamps and {p: p.read_bytes() for p in demo.rglob("config.json")} == configs
    assert json.loads((demo / "report" / "summary.json").read_text())["model"] == "ballad-tiny"


def listed_commands(help_text: str) -> list[str]:
    """The names in the Commands panel of a --help page: each row of the panel starts with one (its help text may
    mention other commands, and wrapped help lines start blank)."""
    panel = help_text.split("Commands")[-1]
    return [m.group(1) for line in panel.splitlines() if (m := re.match(r"\W (\w[\w-]*) ", line))]


def test_help_lists_every_command():
    """Catches a command missing from --help (the words also appear in other commands' help text)."""
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    expected = {"finetune", "extract-features", "fit-adapter", "evaluate", "sweep", "export", "predict", "demo"}
    assert expected | {"cache", "data"} <= set(listed_commands(r.output)), r.output
    r = runner.invoke(app, ["cache", "--help"])
    assert {"info", "verify"} <= set(listed_commands(r.output)), r.output


@pytest.mark.slow
def test_tiny_demo_runs_with_ballad_lite(ballad_data, tmp_path):
    r = runner.invoke(
        app,
        ["demo", "--out", str(tmp_path / "lite"), "--size", "tiny", "--device", "cpu"],  # the default model
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "lite" / "report" / "summary.json").read_text())
    assert summary["model"] == "ballad-lite"
    config = json.loads((tmp_path / "lite" / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    r = runner.invoke(app, ["demo", "--model", "ballad-huge", "--out", str(tmp_path / "x"), "--size", "tiny"])
    assert r.exit_code == 2 and "--model" in r.output and "ballad-huge" in r.output  # a usage error, like any option
