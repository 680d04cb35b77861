"""Beyond BALLAD on the same cache: logit-adjusted loss, cosine head, prompt ensembles, all in one sweep."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ballad_cache.heads.adapter import TrainRows, adapter_logits, fit_adapters
from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.pipelines.phase_b import expand_grid, fit_on_cache
from ballad_cache.store.cache import FeatureCache
from cli.main import app

runner = CliRunner()
COUNTS = [200, 120, 80, 50, 30, 18, 12, 8, 6, 5]


def test_la_gradient_equals_the_hand_written_formula(lt_cache):
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings().double().numpy()
    batch = np.arange(0, len(rows.image_labels), 23)[:16]
    r, tau, s = 0.3, 1.5, 100.0
    init = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    one_step = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "batch_size": len(batch)}
    one_step.update(schedule="step", select="last", ratio=r)
    cfg = AdapterConfig(loss="la", la_tau=tau, **one_step)
    fit = fit_adapters(rows, lt_cache.text_embeddings(), [cfg], stream=[batch], init=init)
    grad = (init - fit.weights[0]).double().numpy()  # one SGD step at lr 1, no momentum or decay: W - grad
    # by hand: z = s * u · Tᵀ + tau * log(prior), u = h / |h|, h = r W f + (1 - r) f
    f = rows.features[batch].double().numpy()
    y = rows.image_labels[batch]
    counts = np.bincount(rows.image_labels, minlength=10)
    w = init.double().numpy()
    h = r * f @ w.T + (1 - r) * f
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    u = h / norm
    z = s * u @ text.T + tau * np.log(counts / counts.sum())
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g_z = (p - np.eye(10)[y]) / len(batch)
    g_u = s * g_z @ text
    g_h = (g_u - u * (u * g_u).sum(1, keepdims=True)) / norm
    expected = r * g_h.T @ f
    np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-4)
    ce = AdapterConfig(**one_step)
    plain = fit_adapters(rows, lt_cache.text_embeddings(), [ce], stream=[batch], init=init)
    assert not torch.allclose(plain.weights[0], fit.weights[0], atol=1e-4)  # the prior term changes the step


def test_cosine_head_with_zero_steps_predicts_what_the_text_head_predicts(lt_cache, tmp_path):
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    test = lt_cache.load_split("test")
    configs = [AdapterConfig(epochs=0, head="text"), AdapterConfig(epochs=0, head="cosine")]
    fit = fit_adapters(rows, text, configs)
    assert fit.heads[0] is None and fit.heads[1] is not None
    by_text = adapter_logits(test.features, fit.weights[0], 0.2, text, 100.0).argmax(1)
    by_head = adapter_logits(test.features, fit.weights[1], 0.2, fit.heads[1], 25.0).argmax(1)
    assert torch.equal(by_text, by_head)
    # --ratio 0 trains the head alone
    fit_on_cache(lt_cache, AdapterConfig(epochs=5, batch_size=64, head="cosine", ratio=0.0), tmp_path / "ad")
    adapter = load_adapter(tmp_path / "ad", lt_cache)
    rows = adapter.head.state()["head"]
    assert not torch.allclose(rows, text, atol=1e-3)
    head_only = 25.0 * F.normalize(test.features, dim=-1) @ F.normalize(rows, dim=-1).T  # ratio 0: no W
    torch.testing.assert_close(adapter.logits(test.features), head_only, atol=1e-4, rtol=0)


def test_batched_mixed_losses_and_heads_equal_each_point_alone(lt_cache):
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    val = lt_cache.load_split("val")
    grid = expand_grid(AdapterConfig(epochs=3, batch_size=64), loss=["ce", "la"], head=["text", "cosine"])
    together = fit_adapters(rows, text, grid, chunk=len(grid), val=(val.features, val.labels))
    for k, cfg in enumerate(grid):
        alone = fit_adapters(rows, text, [cfg], val=(val.features, val.labels))
        torch.testing.assert_close(together.weights[k], alone.weights[0], atol=1e-5, rtol=0)
        assert together.best_epoch[k] == alone.best_epoch[0]
        if cfg.head == "cosine":
            torch.testing.assert_close(together.heads[k], alone.heads[0], atol=1e-5, rtol=0)


def test_sweep_takes_loss_head_and_tau_as_axes(lt_cache, tmp_path):
    args = ["sweep", "--cache", str(lt_cache.path), "--out", str(tmp_path / "s"), "--loss", "ce,la"]
    args += ["--head", "text,cosine", "--ratio", "0.2,0.4", "--epochs", "3", "--batch-size", "64", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 to train" in r.output
    rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert len(rows) == 8
    assert {(x["loss"], x["head"], x["ratio"]) for x in rows} == {
        (loss, head, ratio) for loss in ("ce", "la") for head in ("text", "cosine") for ratio in ("0.2", "0.4")
    }
    assert {"la_tau", "head_scale", "steps", "best_epoch"} <= set(rows[0])
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert {p["config"]["head"] for p in results["points"]} == {"text", "cosine"}
    other = [*args[:5], "--loss", "la", "--la-tau", "0.5,1,2", "--ratio", "0.2", "--epochs", "3", "--batch-size", "64"]
    r = runner.invoke(app, other)  # another grid (it lacks the ce points): refused, nothing touched
    assert r.exit_code == 1 and "already holds another sweep run" in r.output
    r = runner.invoke(app, [*args, "--la-tau", "0.5,1,2"])  # the same grid plus la points at two more strengths
    assert r.exit_code == 0 and "16 points, 8 already done, 8 to train" in r.output, r.output
    rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert sorted(float(x["la_tau"]) for x in rows if x["loss"] == "la") == [0.5] * 4 + [1.0] * 4 + [2.0] * 4
    assert {float(x["la_tau"]) for x in rows if x["loss"] == "ce"} == {1.0}  # ce points do not read it
    r = runner.invoke(app, [*other, "--overwrite"])  # --overwrite replaces the old grid's results
    assert r.exit_code == 0 and "3 points, 0 already done, 3 to train" in r.output, r.output
    assert len(list(csv.DictReader((tmp_path / "s" / "results.csv").open()))) == 3


def test_prompt_ensembles_are_the_renormalised_template_mean(ballad_data, tmp_path):
    from ballad_cache.inputs.datasets import load_dataset, load_templates
    from ballad_cache.models.clip import load_model

    out = tmp_path / "cache"
    args = ["extract-features", "--data", "fmnist-lt", "--model", "ballad-micro", "--out", str(out)]
    args += ["--templates", "openai-imagenet", "--train-views", "0", "--workers", "0", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cache = FeatureCache(out)
    templates = load_templates("openai-imagenet")
    assert cache.manifest["templates"] == templates and len(templates) == 80
    per_template = cache.text_embeddings(per_template=True)
    assert per_template.shape == (10, 80, 64)
    loaded = load_model("ballad-micro")
    classnames = load_dataset("fmnist-lt").classnames
    with torch.no_grad():  # encode every prompt here, average per class, renormalise
        prompts = [t.replace("{c}", c) for c in classnames for t in templates]
        emb = F.normalize(loaded.model.encode_text(loaded.tokenizer(prompts)), dim=-1).view(10, 80, -1)
    torch.testing.assert_close(cache.text_embeddings(), F.normalize(emb.mean(1), dim=-1), atol=1e-5, rtol=0)
    r = runner.invoke(app, ["fit-adapter", "--cache", str(out), "--out", str(tmp_path / "ad"), "--batch-size", "128"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["template_set"] == "openai-imagenet" and meta["templates"] == templates


def test_bf16_fit_keeps_fp32_state_and_lands_near_fp32(lt_cache):
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    val, test = lt_cache.load_split("val"), lt_cache.load_split("test")
    cfg = AdapterConfig(epochs=3, batch_size=64)
    fp32 = fit_adapters(rows, text, [cfg], val=(val.features, val.labels))
    bf16 = fit_adapters(rows, text, [replace(cfg, precision="bf16")], val=(val.features, val.labels))
    assert bf16.weights.dtype == torch.float32 and not torch.equal(bf16.weights, fp32.weights)  # bf16 really ran
    assert (bf16.weights - fp32.weights).abs().max() < 0.05
    acc = [
        (adapter_logits(test.features, f.weights[0], 0.2, text).argmax(1) == test.labels).float().mean()
        for f in (fp32, bf16)
    ]
    assert abs(acc[0] - acc[1]) * 100 <= 2.0
    with pytest.raises(ValueError, match="precision"):
        AdapterConfig(precision="fp8")
