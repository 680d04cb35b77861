"""Losses and heads are registered terms: a loss registered here trains through fit-adapter and sweep unchanged."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import torch
from typer.testing import CliRunner

from ballad_cache.heads.adapter import TrainRows, fit_adapters
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.terms import LOSSES, LossContext, cross_entropy, register_loss
from ballad_cache.pipelines.phase_b import expand_grid, point_key
from cli.main import app
from tests.rounding import assert_trained_alike, float64_rows

runner = CliRunner()


def balanced_softmax(logits: torch.Tensor, labels: torch.Tensor, context: LossContext) -> torch.Tensor:
    """Balanced softmax (Ren et al., 2020): cross-entropy on logits + log prior, at full strength."""
    return cross_entropy(logits + context.log_prior.view(1, 1, -1), labels, context)


def test_a_loss_registered_in_a_test_trains_through_fit_adapter_and_sweep(lt_cache, tmp_path):
    """Adding a phase-B loss is one function and one registration: no other file changes. It also checks that the
    loss really ran: the registered loss equals `la` at tau 1, so the weights match an `la` fit exactly."""
    register_loss("bsm-test", balanced_softmax, help="balanced softmax")
    try:
        common = ["--cache", str(lt_cache.path), "--epochs", "2", "--batch-size", "64", "--device", "cpu"]
        r = runner.invoke(app, ["fit-adapter", *common, "--out", str(tmp_path / "a"), "--loss", "bsm-test"])
        assert r.exit_code == 0, r.output
        meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
        assert meta["config"]["loss"] == "bsm-test"
        r = runner.invoke(app, ["sweep", *common, "--out", str(tmp_path / "s"), "--loss", "ce,bsm-test"])
        assert r.exit_code == 0, r.output
        rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
        assert sorted(x["loss"] for x in rows) == ["bsm-test", "ce"]
        # the registered loss is the logit-adjusted loss at tau 1: the same weights, bitwise
        rows_t = TrainRows.from_split(lt_cache.load_split("train"))
        text = lt_cache.text_embeddings()
        cfg = AdapterConfig(epochs=2, batch_size=64, select="last")
        ours = fit_adapters(rows_t, text, [AdapterConfig(**{**cfg.to_dict(), "loss": "bsm-test"})])
        la = fit_adapters(rows_t, text, [AdapterConfig(**{**cfg.to_dict(), "loss": "la", "la_tau": 1.0})])
        ce = fit_adapters(rows_t, text, [cfg])
        assert torch.equal(ours.weights, la.weights) and not torch.equal(ours.weights, ce.weights)
    finally:
        LOSSES.unregister("bsm-test")
    r = runner.invoke(app, ["fit-adapter", *common, "--out", str(tmp_path / "b"), "--loss", "bsm-test"])
    assert r.exit_code == 2 and "--loss" in r.output and "unknown" in r.output


def test_mixed_losses_in_one_chunk_train_as_each_alone(lt_cache):
    """ce and la adapters batched in one chunk give the weights each gets when fitted alone (per-loss groups). The
    fits run in float64: a batched matmul may sum in another order, within `training_bound` of the movement."""
    from ballad_cache.heads.adapter import init_weight

    rows = float64_rows(TrainRows.from_split(lt_cache.load_split("train")))
    text = lt_cache.text_embeddings().double()
    configs = [AdapterConfig(epochs=2, batch_size=64, select="last", loss=loss) for loss in ("ce", "la", "ce")]
    together = fit_adapters(rows, text, configs, chunk=3)
    for j, c in enumerate(configs):
        alone = fit_adapters(rows, text, [c])
        assert_trained_alike(together.weights[j], alone.weights[0], init_weight(32, c.seed), alone.steps, 32 + 10)
    assert not torch.allclose(together.weights[0], together.weights[1])


def test_point_keys_hash_every_field_at_its_exact_value():
    """Two configurations that differ anywhere never share a key: a float differing in the 7th digit, the precision,
    a field that a subclass adds, the cache fingerprint."""

    @dataclass
    class Extended(AdapterConfig):
        label_smoothing: float = 0.0  # a field added later, unknown to point_key

    base = AdapterConfig()
    assert point_key(AdapterConfig(lr=0.2), "f") != point_key(AdapterConfig(lr=0.2000001), "f")
    assert point_key(base, "f") != point_key(AdapterConfig(precision="bf16"), "f")
    assert point_key(base, "f") != point_key(base, "g")
    assert point_key(Extended(label_smoothing=0.0), "f") != point_key(Extended(label_smoothing=0.1), "f")
    assert point_key(base, "f") == point_key(AdapterConfig(), "f")


def test_grid_points_are_checked_and_unused_params_collapse():
    """Sweep points get fit-adapter's checks; la_tau varies only at la points."""
    import pytest

    grid = expand_grid(AdapterConfig(), loss=["ce", "la"], la_tau=[0.5, 1.0, 2.0])
    assert sorted((c.loss, c.la_tau) for c in grid) == [("ce", 1.0), ("la", 0.5), ("la", 1.0), ("la", 2.0)]
    for bad in ({"lr": [0.2, -0.1]}, {"lr": [float("nan")]}, {"weight_decay": [-1.0]}):
        with pytest.raises(ValueError):
            expand_grid(AdapterConfig(), **bad)
