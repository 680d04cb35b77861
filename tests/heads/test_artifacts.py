"""Head files (ballad_cache.heads.artifacts): every family's head saved and loaded back scores as it did."""

from __future__ import annotations

import json

import pytest
import torch

from ballad_cache.errors import BalladError
from ballad_cache.heads.artifacts import ADAPTER_META, ADAPTER_WEIGHTS, load_adapter, save_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.registry import HEADS
from ballad_cache.pipelines.phase_b import fit_data


@pytest.mark.parametrize("head", ["text", "cosine", "tip", "tip-f", "gda", "ncm"])
def test_a_saved_head_loads_back_bitwise(lt_cache, tmp_path, head):
    """Catches a family whose saved tensors do not make the same head again (a tensor left out, renamed, cast, or
    the context rebuilt from other counts): the loaded head's logits equal the fitted head's bitwise."""
    extra = {"epochs": 2, "batch_size": 64} if head in ("text", "cosine", "tip-f") else {}
    config = AdapterConfig(head=head, **extra)
    data = fit_data(lt_cache)
    fitted = HEADS.get(head).fit(data, config)
    assert fitted.head is not None
    save_adapter(tmp_path / head, fitted.head, lt_cache, {"note": 1})
    loaded = load_adapter(tmp_path / head, lt_cache)
    test = lt_cache.load_split("test").features
    assert torch.equal(loaded.logits(test), fitted.head.logits(test))
    assert loaded.config == config and loaded.meta["note"] == 1
    assert set(loaded.head.state()) == set(fitted.head.state())


def test_damaged_or_foreign_head_files_are_one_line(lt_cache, tmp_path):
    """Catches a head file that loads with a tensor missing or misshapen, an adapter.json that is not an object, and
    a cache other than the one the head was fitted on, reaching the caller as anything but one BalladError."""
    from safetensors.torch import load_file, save_file

    fitted = HEADS.get("text").fit(fit_data(lt_cache), AdapterConfig(epochs=2, batch_size=64))
    assert fitted.head is not None
    save_adapter(tmp_path / "a", fitted.head, lt_cache)
    weights, meta = tmp_path / "a" / ADAPTER_WEIGHTS, tmp_path / "a" / ADAPTER_META
    body = json.loads(meta.read_text())
    tensors = load_file(str(weights))
    save_file({"weight": tensors["weight"][:5].contiguous()}, str(weights))
    body.pop("weights_sha256")
    meta.write_text(json.dumps(body))
    with pytest.raises(BalladError, match="shape"):
        load_adapter(tmp_path / "a", lt_cache)
    save_file({"other": tensors["weight"]}, str(weights))
    with pytest.raises(BalladError, match="no adapter weight"):
        load_adapter(tmp_path / "a", lt_cache)
    meta.write_text("[1]")
    with pytest.raises(BalladError, match="not a JSON object"):
        load_adapter(tmp_path / "a", lt_cache)
    body["cache_fingerprint"] = "0" * 16
    meta.write_text(json.dumps(body))
    save_file(tensors, str(weights))
    with pytest.raises(BalladError, match="refit it on"):
        load_adapter(tmp_path / "a", lt_cache)
