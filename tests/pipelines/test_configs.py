"""`pipelines/configs.py`: the pipelines' defaults are the official code's, their checks refuse what cannot run, and
the registered phase-A optimizers and losses compute what their help says (losses against float64 formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ballad_cache.options import OptionError
from ballad_cache.pipelines.configs import (
    FINETUNE_PRECISIONS,
    OPTIMIZERS,
    PHASE_A_LOSSES,
    DemoConfig,
    EvalConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
)
from ballad_cache.registry import PRECISIONS


def test_finetune_defaults_are_the_official_phase_a():
    """gaopengcuhk/BALLAD `config/ImageNet_LT/clip_A_rn50.yaml`, `train.py`: SGD lr 1e-5, momentum 0.9, weight
    decay 5e-4, 50 epochs of batch 512 at the per-epoch cosine, floor(N/B) full batches, the model in eval mode,
    cross-entropy over the class prompts, the official augmentation; fp32 weights are ballad's own default."""
    c = FinetuneConfig(workers=0)
    official = {
        "epochs": 50,
        "batch_size": 512,
        "lr": 1e-5,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "epoch",
        "warmup_steps": 0,
        "keep_last_batch": False,
        "augment": "official",
        "train_mode": False,
        "accum_steps": 1,
        "loss": "ce",
        "precision": "fp32",
    }
    assert {k: getattr(c, k) for k in official} == official
    assert c.idle_reason() is None


def test_finetune_refuses_adamw_on_official_fp16_weights_and_says_when_it_trains_nothing():
    assert {"fp32", "bf16", "fp16-official"} <= set(FINETUNE_PRECISIONS)
    assert FINETUNE_PRECISIONS.get("fp16-official") == "float16"
    assert all(FINETUNE_PRECISIONS.get(p) == PRECISIONS.get(p) for p in PRECISIONS)
    with pytest.raises(OptionError, match="fp16-official trains float16 weights with the official SGD") as info:
        FinetuneConfig(workers=0, precision="fp16-official", optimizer="adamw")
    assert info.value.field == "precision"
    FinetuneConfig(workers=0, precision="fp16-official")  # with SGD: the official combination
    assert "0 epochs" in FinetuneConfig(workers=0, epochs=0).idle_reason()
    assert "lr 0" in FinetuneConfig(workers=0, lr=0.0).idle_reason()
    assert "1 epoch" in FinetuneConfig(workers=0, epochs=1).idle_reason()  # the official cosine starts at lr 0 ... 0
    assert FinetuneConfig(workers=0, epochs=1, schedule="step").idle_reason() is None
    assert FinetuneConfig(workers=0, epochs=1, warmup_steps=3).idle_reason() is None
    with pytest.raises(OptionError, match="accum_steps must be >= 1"):
        FinetuneConfig(workers=0, accum_steps=0)


def test_registered_optimizers_carry_the_configs_rates():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = OPTIMIZERS.get("sgd")(params, FinetuneConfig(workers=0, lr=0.5, momentum=0.8, weight_decay=0.01), False)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.8, 0.01)
    adamw = OPTIMIZERS.get("adamw")(params, FinetuneConfig(workers=0, lr=0.5, weight_decay=0.01), False)
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (0.5, 0.01)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of log Σ_j exp(z_j) - z_label, written out (float64)."""
    top = logits.max(dim=1, keepdim=True).values
    lse = top[:, 0] + torch.log(torch.exp(logits - top).sum(dim=1))
    return (lse - logits[torch.arange(len(labels)), labels]).mean()


def test_phase_a_ce_is_cross_entropy_over_100_image_text_logits():
    """Catches another scale or a loss over the wrong axis. In float64: the two sides differ by float64 rounding
    (a dot product of 16 terms, a log-sum-exp of 5, logits up to 100), far below 1e-10 of the loss."""
    image, text = _unit(8, 16, seed=0), _unit(5, 16, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss = PHASE_A_LOSSES.get("ce")(image, text, labels)
    expected = _cross_entropy(100 * image @ text.T, labels)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, expected.item())
    assert 1e-3 < expected.item()  # not a degenerate case where any scale gives 0


def test_phase_a_contrastive_is_the_symmetric_clip_loss_over_image_caption_pairs():
    """Each image against its label's caption, images against captions and captions against images, averaged."""
    image, text = _unit(6, 16, seed=2), _unit(4, 16, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = PHASE_A_LOSSES.get("contrastive")(image, text, labels)
    logits = 100 * image @ text[labels].T
    target = torch.arange(6)
    expected = 0.5 * (_cross_entropy(logits, target) + _cross_entropy(logits.T, target))
    assert abs(loss.item() - expected.item()) <= 1e-10 * max(1.0, expected.item())
    assert not math.isclose(loss.item(), _cross_entropy(logits, target).item(), rel_tol=1e-6)  # both directions


def test_extract_defaults_and_checks():
    c = ExtractConfig(workers=0)
    assert (c.splits, c.train_views, c.augment, c.augment_on) == ((), 16, "official", "device")
    assert (c.dtype, c.shard_size, c.batch_size, c.seed, c.precision) == ("float16", 16384, 256, 0, "fp32")
    assert not (c.skip_bad or c.draft or c.overwrite)
    with pytest.raises(OptionError, match="dtype 'bfloat16' is unknown; known: float16, float32"):
        ExtractConfig(workers=0, dtype="bfloat16")
    with pytest.raises(OptionError, match="augment_on 'gpu' is unknown; known: worker, device"):
        ExtractConfig(workers=0, augment_on="gpu")
    with pytest.raises(OptionError, match="shard_size must be >= 1"):
        ExtractConfig(workers=0, shard_size=0)
    with pytest.raises(OptionError, match="train_views must be >= 0"):
        ExtractConfig(workers=0, train_views=-1)


def test_eval_defaults_are_ballads_shot_groups_and_bad_groups_are_refused():
    c = EvalConfig()
    assert (c.split, c.tau, c.knn, c.many, c.few, c.plot) == ("test", None, None, 100, 20, False)
    with pytest.raises(OptionError, match="few") as info:
        EvalConfig(many=10, few=20)
    assert info.value.field == "few"
    assert EvalConfig(many=20, few=20).few == 20  # equal bounds: an empty medium group, allowed
    with pytest.raises(OptionError, match="tau must be a finite number"):
        EvalConfig(tau=float("nan"))
    with pytest.raises(OptionError, match="knn must be >= 1"):
        EvalConfig(knn=0)


def test_predict_and_demo_defaults_and_choices():
    p = PredictConfig(workers=0)
    assert (p.top_k, p.tau, p.format, p.split, p.precision) == (5, None, "csv", "test", "fp32")
    with pytest.raises(OptionError, match="format 'xml' is unknown; known: csv, jsonl"):
        PredictConfig(workers=0, format="xml")
    with pytest.raises(OptionError, match="top_k must be >= 1"):
        PredictConfig(workers=0, top_k=0)
    d = DemoConfig()
    assert (d.size, d.model, d.overwrite) == ("full", "ballad-lite", False)
    with pytest.raises(OptionError, match="model 'ballad-micro' is unknown; known: ballad-tiny, ballad-lite"):
        DemoConfig(model="ballad-micro")
