"""Model loading: fail fast offline, prompt encoding at the shortest context is exact."""

import socket

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
    assert "huggingface.co" in message and "--pretrained /path/to/weights" in message
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
    loaded = models.load_model("ballad-micro")
    bank = models.PromptBank(loaded, ["cat", "a very long and oddly named class"], ["a photo of a {c}."])
    assert bank.context_length < 77
    model = loaded.model.eval()
    with torch.no_grad():
        short = bank.encode(model)
        full_tokens = loaded.tokenizer(["a photo of a cat.", "a photo of a a very long and oddly named class."])
        full = torch.nn.functional.normalize(model.encode_text(full_tokens), dim=-1)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_ballad_lite_image_tower_holds_the_packages_imagenet_weights(tmp_path):
    from ballad_cache.models.clip import lite0_checkpoint, save_local_dir

    loaded = load_model("ballad-lite")
    checkpoint = torch.load(lite0_checkpoint(), map_location="cpu", weights_only=True)
    trunk = loaded.model.visual.trunk
    # read the checkpoint by its own (lukemelas) names, independently of the in-order mapping
    torch.testing.assert_close(trunk.conv_stem.weight, checkpoint["_conv_stem.weight"], atol=0, rtol=0)
    torch.testing.assert_close(trunk.bn1.running_var, checkpoint["_bn0.running_var"], atol=0, rtol=0)
    torch.testing.assert_close(trunk.blocks[6][0].conv_pwl.weight, checkpoint["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(trunk.conv_head.weight, checkpoint["_conv_head.weight"], atol=0, rtol=0)
    assert loaded.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and loaded.preprocess_cfg["std"] == (0.5, 0.5, 0.5)
    fresh = torch.nn.init.normal_(torch.empty_like(trunk.conv_stem.weight))
    assert not torch.allclose(fresh, trunk.conv_stem.weight)
    save_local_dir(loaded, loaded.model, tmp_path / "lite")  # local-dir round trip keeps the weights and stats
    again = load_model(f"local-dir:{tmp_path / 'lite'}")
    torch.testing.assert_close(again.model.visual.trunk.conv_head.weight, checkpoint["_conv_head.weight"])
    assert tuple(again.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert "ballad-lite" in list_models()
