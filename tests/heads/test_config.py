"""`heads/config.py`: `AdapterConfig`'s defaults are the official phase B's, its ranges hold, it round-trips through a
dict, its stream key groups what can train together, and a configuration that trains nothing says so."""

import json
from dataclasses import fields, replace

import pytest

from ballad_cache.heads.config import AdapterConfig
from ballad_cache.options import OptionError


def test_defaults_are_the_official_phase_b():
    """gaopengcuhk/BALLAD `config/ImageNet_LT/clip_B_rn50.yaml` and `train.py`: residual ratio 0.2, SGD lr 0.2,
    momentum 0.9, weight decay 5e-4, 10 epochs of batch 512 at the per-epoch cosine, OLTR's class-aware sampler with
    4 samples per class, floor(N/B) full batches, the best val epoch kept, cross-entropy through the text head."""
    c = AdapterConfig()
    official = {
        "ratio": 0.2,
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "epochs": 10,
        "batch_size": 512,
        "sampler": "class-aware",
        "samples_per_class": 4,
        "schedule": "epoch",
        "keep_last_batch": False,
        "select": "best-val",
        "loss": "ce",
        "head": "text",
        "precision": "fp32",
        "seed": 0,
    }
    assert {k: getattr(c, k) for k in official} == official
    assert c.logit_scale == 100.0  # CLIP's scale for the text head
    assert c.idle_reason() is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ratio", 1.5, "ratio must be <= 1, got 1.5"),
        ("ratio", -0.1, "ratio must be >= 0, got -0.1"),
        ("lr", -1.0, "lr must be >= 0, got -1"),
        ("momentum", -0.5, "momentum must be >= 0"),
        ("weight_decay", -1e-4, "weight_decay must be >= 0"),
        ("epochs", -1, "epochs must be >= 0"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("samples_per_class", 0, "samples_per_class must be >= 1"),
        ("head_scale", 0.0, "head_scale must be > 0"),
        ("shrinkage", 0.0, "shrinkage must be > 0"),
        ("beta", 81.0, "beta must be <= 80"),
        ("lr", float("nan"), "lr must be a finite number"),
        ("epochs", 2.5, "epochs must be int"),
        ("sampler", "magic", "sampler 'magic' is unknown; known: class-aware"),
        ("head", "magic", "head 'magic' is unknown"),
        ("loss", "magic", "loss 'magic' is unknown"),
        ("precision", "fp8", "precision 'fp8' is unknown"),
    ],
)
def test_values_out_of_range_or_unknown_are_refused_naming_the_field(field, value, message):
    with pytest.raises(OptionError, match=message) as info:
        AdapterConfig(**{field: value})
    assert info.value.field == field


def test_range_edges_are_accepted_and_json_numbers_converted():
    assert AdapterConfig(ratio=1.0).ratio == 1.0
    assert AdapterConfig(lr=0, epochs=2).lr == 0.0 and isinstance(AdapterConfig(lr=0).lr, float)
    assert AdapterConfig(epochs=3.0).epochs == 3 and isinstance(AdapterConfig(epochs=3.0).epochs, int)


def test_ratio_0_with_the_fixed_text_head_trains_nothing_and_is_refused():
    with pytest.raises(OptionError, match="ratio 0 with a fixed head trains nothing") as info:
        AdapterConfig(ratio=0.0)
    assert info.value.field == "ratio"
    assert AdapterConfig(ratio=0.0, head="cosine").ratio == 0.0  # a learnable head trains alone


def test_dict_round_trip_and_older_files():
    c = AdapterConfig(ratio=0.4, sampler="sqrt", epochs=3, batch_size=64, seed=2, precision="bf16")
    d = c.to_dict()
    assert {f.name for f in fields(AdapterConfig)} == set(d)
    assert AdapterConfig.from_dict(json.loads(json.dumps(d))) == c
    older = {k: v for k, v in d.items() if k != "precision"}  # adapter.json written before the option
    assert AdapterConfig.from_dict({**older, "a_key_from_the_future": 1}).precision == "fp32"
    with pytest.raises(OptionError, match="ratio must be <= 1"):  # a hand-edited file is checked as a CLI value
        AdapterConfig.from_dict({**d, "ratio": 2.0})


def test_stream_key_holds_what_draws_the_batches_and_nothing_else():
    base = AdapterConfig()
    for same in (replace(base, ratio=0.4), replace(base, lr=0.1), replace(base, loss="la"), replace(base, momentum=0)):
        assert same.stream_key() == base.stream_key()
    differ = [
        replace(base, sampler="sqrt"),
        replace(base, samples_per_class=2),
        replace(base, epochs=5),
        replace(base, batch_size=256),
        replace(base, keep_last_batch=True),
        replace(base, seed=1),
    ]
    keys = [c.stream_key() for c in differ]
    assert base.stream_key() not in keys and len(set(keys)) == len(keys)


def test_a_configuration_that_trains_nothing_says_why():
    assert "0 epochs" in AdapterConfig(epochs=0).idle_reason()
    assert "lr 0" in AdapterConfig(lr=0.0).idle_reason()
    one_epoch = AdapterConfig(epochs=1).idle_reason()
    assert "1 epoch" in one_epoch and "lr 0" in one_epoch  # the official cosine is stepped at each epoch start
    assert AdapterConfig(epochs=1, schedule="step").idle_reason() is None
    assert AdapterConfig(epochs=2).idle_reason() is None
    # a learnable head trained at its own rate is not idle at --lr 0
    assert AdapterConfig(head="cosine", lr=0.0, head_lr=0.5, schedule="step").idle_reason() is None
    assert AdapterConfig(head="tip").idle_reason() is None  # built in closed form: nothing to train


def test_logit_scale_is_the_cosine_heads_own():
    assert AdapterConfig(head="cosine", head_scale=30.0).logit_scale == 30.0
