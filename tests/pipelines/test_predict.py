"""predict's inputs and outputs (ballad_cache.pipelines.predict)."""

from __future__ import annotations

import csv
import json

import pytest

from ballad_cache.errors import BalladError
from ballad_cache.pipelines.predict import PredictConfig, Predictions, collect_images, write_predictions


def test_collect_images_walks_folders_and_lists_in_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.png", "d/sub/a.jpg", "c.png", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("c.png\n")
    images = collect_images([str(tmp_path / "d"), str(tmp_path / "list.txt")])
    assert [p.rsplit("/", 2)[-1] for p in images.paths] == ["b.png", "a.jpg", "c.png"]
    with pytest.raises(BalladError, match="does not exist"):
        collect_images([str(tmp_path / "nope")])


def test_predictions_round_trip_through_csv_and_jsonl(tmp_path):
    row = {"path": "a,b.png", "pred": 1, "pred_name": "cat", "prob": 0.75, "top_k": [["cat", 0.75], ["dog", 0.25]]}
    preds = Predictions([row], None, 1.0, [{"path": "bad.png", "reason": "not an image"}])
    write_predictions(preds, tmp_path / "p.csv", "csv", 2)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[0]["path"] == "a,b.png" and rows[0]["top2_name"] == "dog" and rows[1]["skipped"] == "not an image"
    write_predictions(preds, tmp_path / "p.jsonl", "jsonl", 2)
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0]["top_k"][1] == ["dog", 0.25] and lines[1] == {"path": "bad.png", "skipped": "not an image"}
    with pytest.raises(ValueError, match="tau"):
        PredictConfig(tau=float("inf"))


def test_skip_bad_keeps_input_order_and_its_reasons_do_not_ask_for_skip_bad(tmp_path):
    """Catches skipped rows written after the predictions (out of input order) and a skip reason that tells the user
    to pass --skip-bad when it was passed."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ballad_cache.heads.adapter import AdapterHead
    from ballad_cache.heads.config import AdapterConfig
    from ballad_cache.heads.registry import HeadContext
    from ballad_cache.inputs.datasets import ImageSplit
    from ballad_cache.models import load_model
    from ballad_cache.pipelines.export import Classifier
    from ballad_cache.pipelines.predict import predict_split

    names = ["bad0.png", "good1.png", "bad2.png", "good3.png", "bad4.png"]
    for name in names:
        if name.startswith("good"):
            Image.new("RGB", (32, 32), "red").save(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(b"not an image")
    files = [str(tmp_path / n) for n in names]
    loaded = load_model("ballad-micro")
    context = HeadContext(F.normalize(torch.randn(3, loaded.embed_dim), dim=-1), torch.zeros(3), folded=True)
    classifier = Classifier(loaded, AdapterHead(AdapterConfig(), context, None), context, ["a", "b", "c"], {})
    config = PredictConfig(batch_size=2, workers=0, skip_bad=True)
    result = predict_split(classifier, ImageSplit("x", np.full(5, -1), files, files=files), config, torch.device("cpu"))
    for fmt in ("csv", "jsonl"):
        write_predictions(result, tmp_path / f"p.{fmt}", fmt, 3)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == files and [x["path"] for x in lines] == files
    for row, line, name in zip(rows, lines, names, strict=True):
        assert bool(row["skipped"]) == name.startswith("bad") == ("skipped" in line)
        if name.startswith("bad"):
            assert "cannot read image" in row["skipped"] and "--skip-bad" not in row["skipped"]


def test_out_dash_writes_the_predictions_to_standard_output_and_no_file(tmp_path, monkeypatch, capfdbinary):
    monkeypatch.chdir(tmp_path)
    row = {"path": "a.png", "pred": 1, "pred_name": "cat", "prob": 0.75, "top_k": [["cat", 0.75], ["dog", 0.25]]}
    write_predictions(Predictions([row], None, 1.0, []), "-", "csv", 2)
    written = capfdbinary.readouterr().out.decode()
    assert list(csv.DictReader(written.splitlines()))[0]["top2_name"] == "dog"
    assert list(tmp_path.iterdir()) == []  # no file named "-"
    write_predictions(Predictions([row], None, 1.0, []), "/dev/stdout", "jsonl", 2)
    assert json.loads(capfdbinary.readouterr().out.decode())["pred_name"] == "cat"


def test_predict_plot_draws_the_first_predictions_with_their_classes(tmp_path):
    from PIL import Image

    from ballad_cache.pipelines.predict import plot_predictions

    class Split:
        def load(self, i):
            return Image.new("RGB", (8, 8), (i * 40, 0, 0))

    rows = [
        {"index": i, "path": f"{i}.png", "pred_name": name, "label_name": label}
        for i, (name, label) in enumerate([("cat", "cat"), ("dog", "cat"), ("cow", None)])
    ]
    path = plot_predictions(Predictions(rows, None, 1.0, []), Split(), tmp_path / "g.png", limit=2)
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > image.size[1]  # two cells side by side, one row


def test_predict_plot_is_checked_before_any_work(tmp_path):
    from ballad_cache.pipelines.predict import run_predict

    args = ("no-such-model", tmp_path / "p.csv", PredictConfig(workers=0), [str(tmp_path / "none.png")])
    with pytest.raises(BalladError, match="name it .png"):
        run_predict(*args, plot=tmp_path / "grid.jpg")
    (tmp_path / "grid.png").write_bytes(b"kept")
    with pytest.raises(BalladError, match="already exists"):
        run_predict(*args, plot=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes() == b"kept" and not (tmp_path / "p.csv").exists()
