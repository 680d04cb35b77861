import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from ballad_cache.adapter import AdapterConfig, TrainRows, batch_schedule, fit_adapters, load_adapter
from ballad_cache.cache import FeatureCache
from ballad_cache.errors import BalladError
from ballad_cache.evaluate import EvalConfig, evaluate_cache
from ballad_cache.phase_b import expand_grid, fit_on_cache
from ballad_cache.samplers import class_aware, index_stream
from cli.main import app
from tests.conftest import longtail_features, make_cache

runner = CliRunner()
COUNTS = [200, 120, 80, 50, 30, 18, 12, 8, 6, 5]


@pytest.fixture()
def lt_cache(tmp_path) -> FeatureCache:
    rng = np.random.default_rng(0)
    d = longtail_features(rng, COUNTS, dim=32, per_class_eval=40, tail_shift=1.2)
    make_cache(tmp_path / "cache", d["train"], d["val"], d["test"], d["text"][0])
    return FeatureCache(tmp_path / "cache")


def test_class_aware_sampler_is_balanced_in_runs_of_four():
    labels = np.repeat(np.arange(10), COUNTS)
    draws = class_aware(labels, 0, 1, np.random.default_rng(0), samples_per_class=4)
    assert len(draws) == len(labels)
    runs = labels[draws][: len(draws) // 4 * 4].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # four consecutive draws from one class
    per_class = np.bincount(labels[draws], minlength=10)
    assert per_class.max() - per_class.min() <= 8  # balanced despite the 40x imbalance
    again = index_stream(labels, "class-aware", 2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, index_stream(labels, "class-aware", 2, seed=3), strict=True))


def test_fit_adapter_matches_the_plain_pytorch_recipe_every_step(lt_cache):
    cfg = AdapterConfig(epochs=3, batch_size=64)
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    ours = []
    fit = fit_adapters(rows, text, [cfg], on_step=lambda s, loss: ours.append(float(loss[0])))
    # the official recipe, written plainly: nn.Linear, torch.optim.SGD, cosine per step
    torch.manual_seed(cfg.seed)
    linear = nn.Linear(32, 32, bias=False)
    opt = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = batch_schedule(rows, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / len(steps))))
    labels = lt_cache.load_split("train").labels
    ref = []
    for batch in steps:
        x = rows.features[batch].float()
        h = F.normalize(cfg.ratio * linear(x) + (1 - cfg.ratio) * x, dim=-1)
        loss = F.cross_entropy(100 * h @ text.T, labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ref.append(loss.item())
    assert len(ours) == len(ref) == 3 * -(-sum(COUNTS) // 64)
    assert np.abs(np.array(ours) - np.array(ref)).max() < 1e-4
    assert torch.allclose(fit.weights[0], linear.weight.detach(), atol=1e-5)


def test_batched_sweep_equals_each_point_alone(lt_cache):
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    grid = expand_grid(AdapterConfig(epochs=2, batch_size=64), ratio=[0.1, 0.4], lr=[0.05, 0.3])
    together = fit_adapters(rows, text, grid, chunk=len(grid))  # all four in one matmul, as on a GPU
    chunked = fit_adapters(rows, text, grid, chunk=3)  # a ragged split, as the CPU default may choose
    for k, cfg in enumerate(grid):
        alone = fit_adapters(rows, text, [cfg])
        assert torch.allclose(together.weights[k], alone.weights[0], atol=1e-5)
        assert torch.allclose(chunked.weights[k], alone.weights[0], atol=1e-5)
        assert np.abs(together.losses[k] - alone.losses[0]).max() < 1e-5
    assert not torch.allclose(together.weights[0], together.weights[3], atol=1e-3)  # the points really differ


def test_class_balanced_adapter_raises_few_shot_accuracy(lt_cache, tmp_path):
    fit_on_cache(lt_cache, AdapterConfig(epochs=10, batch_size=64), tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter", lt_cache)
    result = evaluate_cache(lt_cache, adapter, EvalConfig())
    zero, ours = result["heads"]["zero-shot"], result["heads"]["adapter"]
    assert zero["few"] < 40.0  # the shifted tail classes are mostly missed zero-shot
    assert ours["few"] > zero["few"] + 25.0
    assert ours["top1"] > zero["top1"]


def test_sweep_cli_ranks_saves_best_and_skips_finished_points(lt_cache, tmp_path):
    args = [
        "sweep",
        "--cache",
        str(lt_cache.path),
        "--out",
        str(tmp_path / "sweep"),
        "--ratio",
        "0.1,0.4",
        "--lr",
        "0.05,0.2",
        "--sampler",
        "class-aware,sqrt",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 to train" in r.output
    import json

    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    vals = [p["val"]["top1"] for p in results["points"]]
    assert len(vals) == 8 and vals == sorted(vals, reverse=True)
    assert (tmp_path / "sweep" / "best" / "adapter.safetensors").exists()
    assert (tmp_path / "sweep" / "heatmap.png").stat().st_size > 1000
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "8 already done, 0 to train" in r.output


def test_evaluate_cli_writes_results_and_refuses_foreign_adapter(lt_cache, tmp_path):
    r = runner.invoke(
        app,
        [
            "fit-adapter",
            "--cache",
            str(lt_cache.path),
            "--out",
            str(tmp_path / "ad"),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(lt_cache.path),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "ev"),
            "--tau",
            "1",
            "--knn",
            "5",
            "--plot",
        ],
    )
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert set(res["heads"]) == {"zero-shot", "adapter", "adapter+LA", "knn@5"}
    assert res["thresholds"] == {"many": 100, "few": 20} and res["train_class_counts"] == COUNTS
    assert (tmp_path / "ev" / "per_class.csv").read_text().count("\n") == 11
    assert (tmp_path / "ev" / "per_class.png").stat().st_size > 1000
    rng = np.random.default_rng(1)
    d = longtail_features(rng, COUNTS, dim=32, per_class_eval=5, tail_shift=1.0)
    make_cache(tmp_path / "other", d["train"], d["val"], d["test"], d["text"][0])
    with pytest.raises(BalladError, match="refit it"):
        load_adapter(tmp_path / "ad", FeatureCache(tmp_path / "other"))
    r = runner.invoke(app, ["evaluate", "--cache", str(tmp_path / "other"), "--adapter", str(tmp_path / "ad")])
    assert r.exit_code == 1 and "fitted on cache" in r.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["fit-adapter", "--ratio", "1.5"], "--ratio"),
        (["fit-adapter", "--epochs", "-1"], "--epochs"),
        (["fit-adapter", "--sampler", "magic"], "--sampler"),
        (["sweep", "--ratio", ""], "--ratio"),
        (["sweep", "--sampler", "class-aware,magic"], "--sampler"),
        (["sweep", "--ratio", "0.2,-0.1"], "--ratio"),
        (["sweep", "--epochs", "10,-2"], "--epochs"),
        (["sweep", "--lr", ","], "--lr"),
    ],
)
def test_bad_options_exit_2_naming_the_option(lt_cache, tmp_path, args, option):
    r = runner.invoke(app, [*args, "--cache", str(lt_cache.path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert option in r.output


def test_knn_backends_agree(lt_cache):
    from ballad_cache.knn import knn_scores

    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    args = (train.features, train.labels, test.features, lt_cache.num_classes, 7)
    by_faiss = knn_scores(*args, backend="faiss")
    by_torch = knn_scores(*args, backend="torch")
    assert by_faiss.shape == (len(test.labels), lt_cache.num_classes)
    torch.testing.assert_close(by_faiss, by_torch, rtol=1e-4, atol=1e-3)
    assert (by_faiss.sum(1) > 0).all()
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn_scores(*args, backend="annoy")
