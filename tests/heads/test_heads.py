"""Beyond BALLAD on the same cache (heads/families: the text and cosine families; heads/adapter): logit-adjusted
loss, cosine head, prompt ensembles, all in one sweep."""

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
from tests.rounding import AMPLIFICATION, EPS32, EPS64, assert_trained_alike, decided, float64_rows

runner = CliRunner()
COUNTS = [200, 120, 80, 50, 30, 18, 12, 8, 6, 5]


def test_la_gradient_equals_the_hand_written_formula(lt_cache):
    """Catches a logit-adjusted loss with another prior, sign or strength, or a gradient through another adapter
    form: one SGD step (float64) against the gradient written out here in numpy."""
    rows = float64_rows(TrainRows.from_split(lt_cache.load_split("train")))
    text = lt_cache.text_embeddings().double().numpy()
    batch = np.arange(0, len(rows.image_labels), 23)[:16]
    r, tau, s = 0.3, 1.5, 100.0
    init = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)).double() * 0.1
    one_step = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "batch_size": len(batch)}
    one_step.update(schedule="step", select="last", ratio=r)
    cfg = AdapterConfig(loss="la", la_tau=tau, **one_step)
    fit = fit_adapters(rows, torch.from_numpy(text), [cfg], stream=[batch], init=init)
    grad = (init - fit.weights[0]).numpy()  # one SGD step at lr 1, no momentum or decay: W - grad
    # by hand: z = s * u · Tᵀ + tau * log(prior), u = h / |h|, h = r W f + (1 - r) f
    f = rows.features[batch].double().numpy()
    y = rows.image_labels[batch]
    counts = np.bincount(rows.image_labels, minlength=10)
    w = init.double().numpy()
    h = r * f @ w.T + (1 - r) * f
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    u = h / norm
    log_prior = np.log(counts / counts.sum()).astype(np.float32)  # the prior is float32 (`class_log_prior`)
    z = s * u @ text.T + tau * log_prior.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g_z = (p - np.eye(10)[y]) / len(batch)
    g_u = s * g_z @ text
    g_h = (g_u - u * (u * g_u).sum(1, keepdims=True)) / norm
    expected = r * g_h.T @ f
    # float64 on both sides: every quantity is a sum of at most d + C = 42 rounded terms, relative 42·eps64; the
    # logit scale s and the softmax amplify that by at most 2s, and W − (W − grad) cancels |W|·eps64 more
    bound = AMPLIFICATION * 42 * EPS64 * (np.abs(expected).max() + np.abs(init.numpy()).max())
    assert np.abs(grad - expected).max() <= bound
    ce = AdapterConfig(**one_step)
    plain = fit_adapters(rows, torch.from_numpy(text), [ce], stream=[batch], init=init)
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
    # at ratio 0 the adapter adds 0 · W f (exactly 0) to 1 · f (exactly f): the head runs the ops written here, in
    # the same order on the same rows, so bitwise
    assert torch.equal(adapter.logits(test.features), head_only)


def test_batched_mixed_losses_and_heads_equal_each_point_alone(lt_cache):
    """Catches points of one batched fit that mix their losses or heads: each point's weights, head rows and kept
    epoch are the ones it gets alone. In float64, within `training_bound` (a batched matmul may sum otherwise)."""
    from ballad_cache.heads.adapter import init_weight

    rows = float64_rows(TrainRows.from_split(lt_cache.load_split("train")))
    # unit in float64, as `fit_adapters` takes it: a cosine head normalises its rows where a text head does not
    text = F.normalize(lt_cache.text_embeddings().double(), dim=-1)
    val = lt_cache.load_split("val")
    val_data = (val.features.double(), val.labels)
    grid = expand_grid(AdapterConfig(epochs=3, batch_size=64), loss=["ce", "la"], head=["text", "cosine"])
    together = fit_adapters(rows, text, grid, chunk=len(grid), val=val_data)
    start = init_weight(32, grid[0].seed)
    terms = 32 + lt_cache.num_classes
    for k, cfg in enumerate(grid):
        alone = fit_adapters(rows, text, [cfg], val=val_data)
        assert_trained_alike(together.weights[k], alone.weights[0], start, alone.steps, terms)
        assert together.best_epoch[k] == alone.best_epoch[0]
        if cfg.head == "cosine":
            assert_trained_alike(together.heads[k], alone.heads[0], F.normalize(text, dim=-1), alone.steps, terms)


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
    from ballad_cache.models.clip import PromptBank, load_model

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
    # each prompt's embedding is the model's (the prompt bank's encoding: the same ops on the same batch, bitwise),
    # and each class's the renormalised mean of its 80, computed here from the stored float32 rows, bitwise
    with torch.inference_mode():
        emb = PromptBank(loaded, classnames, templates).encode(loaded.model, per_template=True)
    assert torch.equal(per_template, emb)
    assert torch.equal(cache.text_embeddings(), F.normalize(per_template.mean(dim=1), dim=-1))
    r = runner.invoke(app, ["fit-adapter", "--cache", str(out), "--out", str(tmp_path / "ad"), "--batch-size", "128"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["template_set"] == "openai-imagenet" and meta["templates"] == templates


def test_bf16_fit_keeps_fp32_state_and_lands_near_fp32(lt_cache):
    from ballad_cache.heads.adapter import init_weight

    rows = TrainRows.from_split(lt_cache.load_split("train"))
    text = lt_cache.text_embeddings()
    val, test = lt_cache.load_split("val"), lt_cache.load_split("test")
    cfg = AdapterConfig(epochs=3, batch_size=64)
    fp32 = fit_adapters(rows, text, [cfg], val=(val.features, val.labels))
    bf16 = fit_adapters(rows, text, [replace(cfg, precision="bf16")], val=(val.features, val.labels))
    assert bf16.weights.dtype == torch.float32 and not torch.equal(bf16.weights, fp32.weights)  # bf16 really ran
    assert not torch.equal(bf16.weights, bf16.weights.bfloat16().float())  # the weights kept float32's bits
    # bf16 rounds each matmul input to 8 significant bits (eps 2⁻⁷), round-to-nearest-even on every CPU and GPU, and
    # sums in float32 (2¹⁶ times finer), so the gap to fp32 is this training's, not the machine's: about half a bf16
    # eps of how far training moved the weights; 4 eps (2⁻⁵) leaves 8 times that, a lost fp32 state far more
    moved = float((fp32.weights[0] - init_weight(32, cfg.seed)).abs().max())
    gap = bf16.weights[0] - fp32.weights[0]
    assert float(gap.abs().max()) <= 2.0**-5 * moved
    # and the two classify alike wherever that gap cannot reach: a weight change δW moves norm(x') by at most
    # 2 · ratio · ‖δW‖ · ‖f‖ / ‖x'‖, so each logit by 100 times that (unit text rows), plus float32's rounding of
    # the scoring itself (normalisations, the adapter's and the text's dot products: (4d + 8)·eps relative)
    f = F.normalize(test.features.double(), dim=-1)
    w32 = fp32.weights[0].double()
    adapted = 0.2 * f @ w32.T + 0.8 * f
    logits = 100 * F.normalize(adapted, dim=-1) @ text.double().T
    reach = 100 * 2 * 0.2 * float(torch.linalg.matrix_norm(gap.double(), ord=2)) / adapted.norm(dim=-1)
    reach = reach + 100 * (4 * 32 + 8) * EPS32
    sure = decided(logits, reach[:, None].expand_as(logits))
    preds = [adapter_logits(test.features, w.weights[0], 0.2, text).argmax(1) for w in (fp32, bf16)]
    assert torch.equal(preds[0][sure], preds[1][sure])
    assert sure.double().mean() >= 0.5  # most rows are decided (378 of 400), so a wrong bf16 fit is caught
    with pytest.raises(ValueError, match="precision"):
        AdapterConfig(precision="fp8")
