"""Model loading (models/clip): fail fast offline, prompt encoding at the shortest context is exact."""

import socket

import numpy as np
import pytest
import torch

from ballad_cache.errors import BalladError
from ballad_cache.models import clip as models
from ballad_cache.models.clip import list_models, load_model


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("the download path ran although the host is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(models, "_cached_weights", lambda cfg: False)
    import open_clip

    monkeypatch.setattr(open_clip, "create_model_and_transforms", must_not_download)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_pretrained_tag_offline_fails_at_once_with_one_clear_line(no_network):
    """Catches the official backbone's `--pretrained openai` hanging or tracebacking without a network: one probe
    with a 3 s timeout, then one line naming the host and the local-weights option."""
    with pytest.raises(BalladError) as info:
        models.load_model("ViT-B-32", "openai")
    message = str(info.value)
    assert "\n" not in message
    assert "huggingface.co" in message and "`pretrained='/path/to/weights'`" in message
    assert no_network == [(("huggingface.co", 443), 3.0)]


def test_hf_hub_offline_is_respected_without_touching_the_network(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BalladError, match="HF_HUB_OFFLINE"):
        models.load_model("ViT-B-32", "openai")
    assert no_network == []


def test_cached_weights_skip_the_network_check(no_network, monkeypatch):
    monkeypatch.setattr(models, "_cached_weights", lambda cfg: True)
    models.check_weights_reachable("ViT-B-32", "openai")
    assert no_network == []


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(BalladError, match="known tags: .*openai"):
        models.load_model("ViT-B-32", "no-such-tag")


def test_shortest_context_encoding_equals_full_context():
    """Catches a trimmed context that changes the text embedding (a token pooled at the wrong position, the causal
    mask or positional embedding cut wrongly): any such slip moves the unit vector by far more than rounding.

    Compared in float64: the two paths sum over different lengths (masked positions add exact zeros, in another
    order), so they differ by float64 rounding alone, about (ops per output) · eps64 ≈ 1e3 · 2.2e-16 on this two-layer
    tower; 1e-9 leaves a wide margin above that and sits far below any real change."""
    loaded = models.load_model("ballad-micro")
    bank = models.PromptBank(loaded, ["cat", "a very long and oddly named class"], ["a photo of a {c}."])
    assert bank.context_length < 77
    model = loaded.model.eval().double()
    with torch.no_grad():
        short = bank.encode(model)
        full_tokens = loaded.tokenizer(["a photo of a cat.", "a photo of a a very long and oddly named class."])
        full = torch.nn.functional.normalize(model.encode_text(full_tokens), dim=-1)
    assert short.dtype == full.dtype == torch.float64
    torch.testing.assert_close(short, full, atol=1e-9, rtol=0)


def lukemelas_to_timm(name: str) -> str | None:
    """The timm `tf_efficientnet_lite0` name of a lukemelas EfficientNet-Lite0 checkpoint tensor (None: the ImageNet
    classifier, which a headless trunk has no place for). Written from the two architectures' block layouts, apart
    from the loader's in-order mapping: stages of 1, 2, 2, 3, 3, 4, 1 blocks; the first block has no expansion."""
    if name.startswith("_fc."):
        return None
    stem = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    head, _, rest = name.partition(".")
    if head in stem:
        return f"{stem[head]}.{rest}"
    number, layer, leaf = rest.split(".", 2)
    starts = np.cumsum([0, 1, 2, 2, 3, 3, 4])
    stage = int(np.searchsorted(starts, int(number), side="right")) - 1
    if stage == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{int(number) - starts[stage]}.{names[layer]}.{leaf}"


def test_ballad_lite_holds_the_packages_pretrained_weights_in_both_towers(tmp_path):
    """Catches a tower left at (or reset to) random initialisation, or checkpoint tensors put in the wrong places:
    every tensor of the image trunk equals, bitwise, the package checkpoint's tensor of the same role (found by
    name, apart from the loader's in-order mapping), and the text tower the MiniLM package's weights; the local-dir
    round trip keeps every tensor bitwise."""
    from safetensors.torch import load_file

    from ballad_cache.models.clip import lite0_checkpoint, minilm_path, save_local_dir

    loaded = load_model("ballad-lite")
    assert not loaded.random_weights
    checkpoint = torch.load(lite0_checkpoint(), map_location="cpu", weights_only=True)
    trunk = loaded.model.visual.trunk.state_dict()
    mapped = {lukemelas_to_timm(k): v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")}
    mapped.pop(None)
    assert set(mapped) == {k for k in trunk if not k.endswith("num_batches_tracked")}
    for name, value in mapped.items():
        assert torch.equal(trunk[name], value), name
    minilm = load_file(str(minilm_path() / "model.safetensors"))
    text = loaded.model.text.transformer.state_dict()
    assert set(text) <= set(minilm), sorted(set(text) - set(minilm))  # the package also holds a pooler, unused
    for name, value in text.items():
        assert torch.equal(value, minilm[name]), name
    assert loaded.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and loaded.preprocess_cfg["std"] == (0.5, 0.5, 0.5)
    save_local_dir(loaded, loaded.model, tmp_path / "lite")  # local-dir round trip keeps the weights and stats
    again = load_model(f"local-dir:{tmp_path / 'lite'}")
    before, after = loaded.model.state_dict(), again.model.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tuple(again.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert "ballad-lite" in list_models()


def test_a_registered_architecture_reaches_open_clip_through_its_public_add_model_config():
    """Catches a registered config that open_clip never sees (`--model NAME` unknown to open_clip), one handed over
    twice, and a config open_clip ignores (no text tower) passing silently."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    calls = []
    models.register_model("ballad-test-handover", lambda: calls.append(1) or cfg, random_init=True)
    models.register_model("ballad-test-no-text", lambda: {"embed_dim": 16, "vision_cfg": {}}, random_init=True)
    try:
        assert "ballad-test-handover" not in open_clip.list_models()
        models._add_to_open_clip("ballad-test-handover")
        models._add_to_open_clip("ballad-test-handover")
        assert open_clip.get_model_config("ballad-test-handover") == cfg and calls == [1]
        with pytest.raises(ValueError, match="open_clip refused the config of model 'ballad-test-no-text'"):
            models._add_to_open_clip("ballad-test-no-text")
    finally:
        models.MODELS.unregister("ballad-test-handover")
        models.MODELS.unregister("ballad-test-no-text")
