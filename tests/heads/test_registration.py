"""heads/registry: a head family registered in this file alone goes through every command (fit-adapter, sweep,
evaluate, export and predict) with no line of `ballad` naming it. The family: a fixed random projection of the
features (drawn at the fit, C×d, rows normalised) blended with the text head, `100 · f·Tᵀ + α · 100 · f·Pᵀ`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.registry import (
    FAMILIES,
    HEADS,
    FitData,
    Fitted,
    Head,
    HeadContext,
    HeadFamily,
    register_head,
    unregister_head,
)
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model, save_local_dir
from ballad_cache.pipelines.export import load_classifier
from ballad_cache.pipelines.extract import ExtractConfig, extract_features
from ballad_cache.store.cache import FeatureCache
from cli.main import app
from tests.rounding import EPS32, FRESH32, HALF16, decided, feature_slack, top1_range

runner = CliRunner()


class ProjectionHead(Head):
    def __init__(self, config: AdapterConfig, context: HeadContext, projection: torch.Tensor) -> None:
        self.config, self.context, self.projection = config, context, projection

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.cpu().float(), dim=-1)
        return 100.0 * f @ self.context.text.float().T + self.config.alpha * 100.0 * f @ self.projection.T

    def state(self) -> dict[str, torch.Tensor]:
        return {"projection": self.projection}


class ProjectionFamily(HeadFamily):
    reads = ("alpha",)
    grids = {"proj": ("a random projection blended with the text head", {"alpha": [0.5, 4.0]})}

    def fit(self, data: FitData, config: AdapterConfig, device="cpu", progress=None) -> Fitted:
        # unseeded on purpose: a command that fitted again instead of loading the saved tensors scores otherwise
        projection = F.normalize(torch.randn(data.context.num_classes, data.context.dim), dim=-1)
        return Fitted(ProjectionHead(config, data.context, projection))

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        projection = state["projection"]
        if tuple(projection.shape) != (context.num_classes, context.dim):
            raise ValueError(f"a projection of shape {tuple(projection.shape)}")
        return ProjectionHead(config, context, projection.float())


@pytest.fixture
def projection_head():
    register_head("proj", ProjectionFamily(), help="a fixed random projection blended with the text head")
    yield
    unregister_head("proj")
    assert "proj" not in HEADS and "proj" not in FAMILIES


def expected_logits(cache: FeatureCache, features: torch.Tensor, alpha: float, weights: Path) -> torch.Tensor:
    """The family's formula, written here in float64 from the cache's text embeddings and the projection saved in
    `weights`."""
    text = cache.text_embeddings().double()
    projection = load_file(str(weights))["projection"].double()
    f = F.normalize(features.double(), dim=-1)
    return 100.0 * f @ text.T + alpha * 100.0 * f @ projection.T


def head_slack(cache: FeatureCache, features: torch.Tensor, alpha: float, weights: Path) -> torch.Tensor:
    """How far the head's float32 logits can be from `expected_logits` (the same float32 text and projection rows):
    float32's normalisation of f moves each coordinate by (d + 2)·eps/2, each dot product is off by d·eps/2 of
    Σ|f̂||row|, the scalings and the sum by eps/2 of their sizes; in eps, twice over."""
    text = cache.text_embeddings().double().abs()
    projection = load_file(str(weights))["projection"].double().abs()
    f = F.normalize(features.double(), dim=-1).abs()
    return (2 * f.shape[1] + 6) * EPS32 * (100.0 * f @ text.T + alpha * 100.0 * f @ projection.T)


def top1_bounds(cache: FeatureCache, split, alpha: float, weights: Path) -> tuple[float, float]:
    """The top-1 the float32 head can give on `split` (`top1_range` of the formula within `head_slack`); at most one
    row may be a near-tie (the projection is drawn unseeded, so the rows near a tie differ from run to run)."""
    scores = expected_logits(cache, split.features, alpha, weights)
    low, high = top1_range(scores, split.labels.long(), head_slack(cache, split.features, alpha, weights))
    assert high - low <= 100 / len(split.labels), (low, high)
    percent = 100 * EPS32  # a top-1 reported through a float32 mean: eps/2 of at most 100
    return low - percent, high + percent


def test_a_head_registered_here_runs_through_every_command(projection_head, ballad_data, tmp_path):
    """Catches a command that decides by head name (a family it does not know is refused, scored as another head, or
    saved without its tensors) or fits a head again where it should load it: fit-adapter, sweep (the family's grid
    and explicit axes), evaluate, export and predict all run on the new family; the exported classifier scores
    features bitwise as the adapter evaluate loads, and predict classifies the test images as evaluate scores them."""
    # the family draws its projection from the global generator: seeded here, so the run is the same every time,
    # while a command that fitted again would still draw another projection further down the stream
    torch.manual_seed(0)
    loaded = load_model("ballad-micro")
    save_local_dir(loaded, loaded.model, tmp_path / "a")
    model = f"local-dir:{tmp_path / 'a'}"
    extract_features(
        load_dataset("fmnist-lt"),
        load_model(model),
        tmp_path / "cache",
        ExtractConfig(train_views=0, workers=0, batch_size=256),
        torch.device("cpu"),
    )
    cache = FeatureCache(tmp_path / "cache")
    common = ["--cache", str(cache.path), "--device", "cpu"]
    val = cache.load_split("val").eval_view()
    test = cache.load_split("test").eval_view()

    fit = runner.invoke(app, ["fit-adapter", *common, "--out", str(tmp_path / "ad"), "--head", "proj", "--alpha", "4"])
    assert fit.exit_code == 0, fit.output
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["config"]["head"] == "proj" and meta["config"]["alpha"] == 4.0
    weights = tmp_path / "ad" / "adapter.safetensors"
    low, high = top1_bounds(cache, val, 4.0, weights)
    assert low <= meta["val"]["top1"] <= high

    sweep = runner.invoke(app, ["sweep", *common, "--out", str(tmp_path / "sw"), "--family", "proj"])
    assert sweep.exit_code == 0, sweep.output
    rows = list(csv.DictReader((tmp_path / "sw" / "results.csv").read_text().splitlines()))
    assert sorted(float(r["alpha"]) for r in rows) == [0.5, 4.0] and {r["head"] for r in rows} == {"proj"}
    for r in rows:  # each point ranked by the family's own logits (results.csv prints 2 decimals)
        low, high = top1_bounds(cache, val, float(r["alpha"]), tmp_path / "sw" / "points" / f"{r['key']}.safetensors")
        assert low - 0.005 <= float(r["val_top1"]) <= high + 0.005
    axes = runner.invoke(app, ["sweep", *common, "--out", str(tmp_path / "sw2"), "--head", "proj", "--alpha", "1,2"])
    assert axes.exit_code == 0, axes.output
    assert (tmp_path / "sw2" / "best" / "adapter.safetensors").exists()

    ev = runner.invoke(app, ["evaluate", *common[:2], "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "ev")])
    assert ev.exit_code == 0, ev.output
    result = json.loads((tmp_path / "ev" / "result.json").read_text())["heads"]
    low, high = top1_bounds(cache, test, 4.0, weights)
    assert low <= result["adapter"]["top1"] <= high

    ex = runner.invoke(
        app, ["export", "--model", model, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "e")]
    )
    assert ex.exit_code == 0, ex.output
    exported = load_classifier(f"local-dir:{tmp_path / 'e'}")
    evaluated = load_adapter(tmp_path / "ad", cache)
    assert torch.equal(exported.score(test.features), evaluated.logits(test.features))  # one scoring path
    zero = 100.0 * F.normalize(test.features.float(), dim=-1) @ cache.text_embeddings().float().T
    assert (evaluated.logits(test.features) - zero).abs().max() > 1.0  # the projection term is there
    out = tmp_path / "preds.csv"
    args = ["predict", "--model", f"local-dir:{tmp_path / 'e'}", "--data", "fmnist-lt", "--split", "test"]
    pr = runner.invoke(app, [*args, "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert pr.exit_code == 0, pr.output
    preds = np.array([int(r["pred"]) for r in csv.DictReader(out.open())])
    order = np.argsort(test.index.numpy())
    cached = evaluated.logits(test.features)[order].double()
    # predict encodes the images afresh: the cache holds the same features as float16 (half an ulp, 2⁻¹¹ of each
    # coordinate) and float32's rounding of the tower on other batches adds far less (FRESH32), so a row counts
    # where its margin exceeds what such moves of the features can make, plus the head's rounding
    slack = feature_slack(lambda f: expected_logits(cache, f, 4.0, weights), test.features[order], HALF16, FRESH32)
    sure = decided(cached, slack + head_slack(cache, test.features[order], 4.0, weights))
    assert (preds[sure.numpy()] == cached.argmax(1).numpy()[sure.numpy()]).all()
    assert sure.double().mean() >= 0.5  # the check decides most rows (the projection is drawn unseeded)


def test_a_registered_family_changes_no_other_familys_options(projection_head):
    """Catches a family's fields leaking into what the others read: registering one that reads `alpha` and not
    `seed` leaves tip reading alpha and the text head reading seed, and refuses only what the new head ignores."""
    from ballad_cache.pipelines.phase_b import expand_grid

    assert AdapterConfig(head="tip", alpha=2.0, seed=3).unread() == []
    assert AdapterConfig(head="text", seed=3, ratio=0.3).unread() == []
    assert AdapterConfig(head="proj", alpha=2.0).unread() == []
    assert AdapterConfig(head="proj", seed=3, ratio=0.3).unread() == ["ratio", "seed"]
    points = expand_grid(AdapterConfig(), head=["text", "proj"], seed=[1, 2])
    assert sorted((p.head, p.seed) for p in points) == [("proj", 0), ("text", 1), ("text", 2)]
