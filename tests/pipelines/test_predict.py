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
