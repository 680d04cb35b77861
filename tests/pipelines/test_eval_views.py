"""Test-time views: LIFT's crops stored once in the cache, averaged per image by every scoring command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.metrics import per_image
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.inputs.transforms import crop_views
from ballad_cache.models.clip import load_model, save_local_dir
from ballad_cache.pipelines.configs import EvalConfig, ExtractConfig
from ballad_cache.pipelines.evaluate import evaluate_cache
from ballad_cache.pipelines.export import build_classifier, export_classifier
from ballad_cache.pipelines.extract import extract_features
from ballad_cache.pipelines.phase_b import fit_on_cache
from ballad_cache.store.cache import FeatureCache
from cli.main import app

runner = CliRunner()


def test_crops_are_lifts_transform_test():
    """The crops equal LIFT's `transform_test` (trainer.py lines 118-130) written here as LIFT writes it."""
    from torchvision import transforms

    loaded = load_model("ballad-micro")
    size, mean, std = 32, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (47, 61, 3), dtype=np.uint8))
    for mode, torchvision_crop in (("five-crop", transforms.FiveCrop), ("ten-crop", transforms.TenCrop)):
        lift = transforms.Compose(
            [
                transforms.Resize(size + 24),
                torchvision_crop(size),
                transforms.Lambda(lambda crops: torch.stack([transforms.ToTensor()(crop) for crop in crops])),
                transforms.Normalize(mean, std),
            ]
        )
        views = crop_views(mode, loaded.preprocess_cfg)
        assert views is not None
        ours = torch.stack(views(image))
        expected = lift(image)
        assert ours.shape == expected.shape == (5 if mode == "five-crop" else 10, 3, size, size)
        assert torch.equal(ours, expected)
    assert crop_views("center", loaded.preprocess_cfg) is None


@pytest.fixture(scope="module")
def crop_caches(fmnist_dir, tmp_path_factory):
    """A model folder, a five-crop float32 cache and an adapter fitted on it, and a center cache of the same model."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BALLAD_DATA", str(fmnist_dir))
    root = tmp_path_factory.mktemp("tte")
    loaded = load_model("ballad-micro")
    save_local_dir(loaded, loaded.model, root / "model")
    model = load_model(f"local-dir:{root / 'model'}")
    dataset = load_dataset("fmnist-lt")
    for name, views in (("five", "five-crop"), ("center", "center")):
        config = ExtractConfig(train_views=0, workers=0, batch_size=256, dtype="float32", eval_views=views)
        extract_features(dataset, model, root / name, config, torch.device("cpu"))
    fit_on_cache(FeatureCache(root / "five"), AdapterConfig(epochs=2, batch_size=128), root / "adapter")
    yield {"model": root / "model", "five": root / "five", "center": root / "center", "adapter": root / "adapter"}
    mp.undo()


def _mean_of_views(cache: FeatureCache, split: str, logits_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (by index), the mean of the logits of its crop rows (view < 0), read from the raw rows here."""
    rows = cache.load_split(split)
    crops = rows.view < 0
    index, feats, labels = rows.index[crops], rows.features[crops], rows.labels[crops]
    images = torch.unique(index)
    logits = logits_of(feats).double()
    mean = torch.stack([logits[index == i].mean(0) for i in images])
    label = torch.stack([labels[index == i][0] for i in images])
    assert all(int((index == i).sum()) == 5 for i in images)
    return mean, label


def test_scoring_averages_the_logits_of_each_images_crops(crop_caches):
    cache = FeatureCache(crop_caches["five"])
    assert cache.eval_views == "five-crop"
    assert cache.manifest["splits"]["test"]["views"] == 6 and cache.manifest["splits"]["train"]["views"] == 1
    adapter = load_adapter(crop_caches["adapter"], cache)
    mean, labels = _mean_of_views(cache, "test", adapter.logits)
    # the scoring path's per-image logits are the mean of the crops' logits (not of their softmax): float32 logits
    # at scale 100 of unit vectors in dim 64 round by at most 100 (64 + 2) eps32 each, and so does their mean
    split = cache.eval_split("test")
    assert split.views == 5 and split.features.shape[0] == 5 * len(split.labels)
    ours = per_image(adapter.logits(split.features), len(split.labels)).double()
    assert torch.equal(split.index, torch.unique(split.index))  # images in index order, as `mean` holds them
    tolerance = 100 * (64 + 2) * torch.finfo(torch.float32).eps
    assert (ours - mean).abs().max() <= tolerance
    result = evaluate_cache(cache, adapter, EvalConfig())
    assert result["views"] == "five-crop"
    expected = 100 * float((mean.argmax(1) == labels).double().mean())
    assert result["heads"]["adapter"]["num_images"] == len(labels)
    # float32 mean of 5 logits vs the float64 one here: only a row within rounding of a tie could differ
    assert abs(result["heads"]["adapter"]["top1"] - expected) <= 100 / len(labels)
    # the center view is still there and scores as a center cache of the same model
    center = evaluate_cache(cache, adapter, EvalConfig(views="center"))["heads"]["adapter"]
    same = evaluate_cache(FeatureCache(crop_caches["center"]), None, EvalConfig())["heads"]["zero-shot"]
    assert center["num_images"] == same["num_images"] == len(labels)
    assert evaluate_cache(cache, None, EvalConfig(views="center"))["heads"]["zero-shot"]["top1"] == same["top1"]


def test_val_ranking_uses_the_crops(crop_caches):
    cache = FeatureCache(crop_caches["five"])
    meta = json.loads((crop_caches["adapter"] / "adapter.json").read_text())
    assert meta["eval_views"]["name"] == "five-crop"
    adapter = load_adapter(crop_caches["adapter"], cache)
    mean, labels = _mean_of_views(cache, "val", adapter.logits)
    expected = 100 * float((mean.argmax(1) == labels).double().mean())
    assert abs(meta["val"]["top1"] - expected) <= 100 / len(labels)


def test_a_cache_without_the_views_asked_for_is_refused(crop_caches):
    with pytest.raises(BalladError, match="holds center eval views, not five-crop; re-extract it with") as exc:
        FeatureCache(crop_caches["center"]).eval_split("test", "five-crop")
    assert "\n" not in str(exc.value)
    r = runner.invoke(app, ["evaluate", "--cache", str(crop_caches["center"]), "--views", "ten-crop"])
    assert r.exit_code == 1 and "--eval-views ten-crop" in r.output
    with pytest.raises(BalladError, match="holds five-crop eval views, not ten-crop"):
        FeatureCache(crop_caches["five"]).eval_split("val", "ten-crop")


def test_predict_applies_the_exported_views_and_equals_evaluate(crop_caches, ballad_data, tmp_path):
    classifier = build_classifier(f"local-dir:{crop_caches['model']}", crop_caches["adapter"])
    export_classifier(classifier, tmp_path / "e")
    assert json.loads((tmp_path / "e" / "classifier.json").read_text())["eval_views"]["crops"] == 5
    out = tmp_path / "p.csv"
    args = ["predict", "--model", f"local-dir:{tmp_path / 'e'}", "--data", "fmnist-lt", "--split", "test"]
    r = runner.invoke(app, [*args, "--out", str(out), "--workers", "0", "--device", "cpu", "--batch-size", "7"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    cache = FeatureCache(crop_caches["five"])
    mean, _ = _mean_of_views(cache, "test", load_adapter(crop_caches["adapter"], cache).logits)
    pred = np.array([int(row["pred"]) for row in rows])
    assert len(pred) == len(mean)
    assert (pred == mean.argmax(1).numpy()).mean() >= 0.995


def test_extract_refuses_to_resume_a_cache_with_other_views(crop_caches, ballad_data, tmp_path):
    r = runner.invoke(
        app,
        ["extract-features", "--data", "fmnist-lt", "--model", f"local-dir:{crop_caches['model']}"]
        + ["--out", str(crop_caches["center"]), "--train-views", "0", "--workers", "0", "--eval-views", "ten-crop"]
        + ["--dtype", "float32", "--batch-size", "256"],
    )
    assert r.exit_code == 1
    assert "eval_views 'center' -> 'ten-crop'" in r.output and "\n" not in r.output.strip().splitlines()[-1]


def test_epoch_selection_scores_val_by_the_mean_of_its_crops():
    """`val_accuracy` (the adapter's per-epoch val top-1) on V·N view-major rows equals the top-1 of the mean of
    each image's V logits, computed here in float64; chunks smaller than one image's views change nothing."""
    from ballad_cache.heads.adapter import val_accuracy

    g = torch.Generator().manual_seed(0)
    views, n, dim, classes = 5, 37, 8, 6
    feats = torch.nn.functional.normalize(torch.randn(views * n, dim, generator=g), dim=-1)
    labels = torch.randint(0, classes, (n,), generator=g)
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    weights = torch.randn(2, dim, dim, generator=g)
    ratios = [0.2, 0.6]
    for j, r in enumerate(ratios):
        x = feats.double()
        moved = torch.nn.functional.normalize(r * x @ weights[j].double().T + (1 - r) * x, dim=-1)
        mean = (100 * moved @ text.double().T).reshape(views, n, classes).mean(0)
        expected = 100 * float((mean.argmax(1) == labels).double().mean())
        for chunk in (3, 10, 8192):
            got = val_accuracy(weights, ratios, text, feats, labels, rows_per_chunk=chunk)[j]
            assert abs(got - expected) <= 100 / n  # a float32 near-tie may flip one image


def test_the_sweep_ranks_and_reports_on_the_crops(crop_caches, tmp_path):
    """Every point's val and the best point's test score average each image's crops."""
    from ballad_cache.pipelines.phase_b import expand_grid, run_grid

    cache = FeatureCache(crop_caches["five"])
    grid = expand_grid(AdapterConfig(epochs=1, batch_size=128), ratio=[0.2, 0.6])
    result = run_grid(crop_caches["five"], tmp_path / "s", grid)
    best = load_adapter(tmp_path / "s" / "best", cache)
    for split, numbers in (("val", result.best["val"]), ("test", result.test)):
        mean, labels = _mean_of_views(cache, split, best.logits)
        expected = 100 * float((mean.argmax(1) == labels).double().mean())
        assert numbers is not None and abs(numbers["top1"] - expected) <= 100 / len(labels)
