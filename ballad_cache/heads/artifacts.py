"""The files a fitted head lives in: `adapter.safetensors` (the head's own tensors, `Head.state`) and
`adapter.json` (its config, the cache it was fitted on, the prompt templates, the training counts, what the fit
recorded). Sweep points and exported classifiers store a head's tensors the same way; `load_head` reads them all.

Nothing is unpickled: tensors are safetensors, metadata JSON, and both are checked against the sha256 recorded at
the fit, so an edited or truncated file is refused in one line instead of scoring with other weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, read_json, sha256_file, sha256_json, write_json
from ..errors import BalladError
from ..inputs.longtail import class_log_prior
from ..store.cache import FeatureCache
from .config import AdapterConfig
from .registry import HEADS, Head, HeadContext

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


@dataclass
class Adapter:
    """A fitted head as `fit-adapter` or `sweep` saved it, loaded against its cache."""

    head: Head
    config: AdapterConfig
    cache_fingerprint: str
    meta: dict[str, Any]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of cached or encoded features (the head's scoring path)."""
        return self.head.logits(features)


def cache_context(cache: FeatureCache, counts: list[int] | None = None) -> HeadContext:
    """The head context of a cache: its class text embeddings and the prior of `counts` (default: its train
    counts)."""
    return HeadContext(cache.text_embeddings().float(), class_log_prior(counts or cache.train_counts.tolist()))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def read_tensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file.

    Raises:
        BalladError: missing, truncated or not safetensors; one line naming the file and `fix`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BalladError(f"{path} does not exist; {fix}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BalladError(f"{path} is not a valid tensor file ({str(exc)[:120]}); {fix}") from None


def load_head(
    config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext, origin: Path, fix: str
) -> Head:
    """The head `config.head`'s family loads from `state`.

    Raises:
        BalladError: the tensors do not make a head of that family for `context` (names `origin` and `fix`).
    """
    state = {k.removeprefix("memory."): v for k, v in state.items()}  # files of ballad 0.1 before head families
    try:
        return HEADS.get(config.head).load(config, state, context)
    except KeyError as exc:
        raise BalladError(f"{origin}: the {config.head} head lacks its {exc} tensor; {fix}") from None
    except ValueError as exc:
        raise BalladError(f"{origin}: {exc}; {fix}") from None


def save_adapter(folder: str | Path, head: Head, cache: FeatureCache, extra: dict[str, Any] | None = None) -> Path:
    """Write `adapter.safetensors` (the head's tensors) and then `adapter.json` (config, cache fingerprint and model,
    the prompt templates of the class embeddings, the training counts, `extra`), which marks the adapter done."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = head.config
    save_tensors(folder / ADAPTER_WEIGHTS, head.state())
    meta = {
        "kind": "ballad-adapter",
        "weights_sha256": sha256_file(folder / ADAPTER_WEIGHTS),  # load_adapter checks the weights against it
        "config_sha256": sha256_json(config.to_dict()),  # and the config
        "config": config.to_dict(),
        "cache_fingerprint": cache.fingerprint,
        "cache": str(Path(cache.path).resolve()),  # absolute: export finds it from any working folder
        "model": cache.manifest["model"],
        "templates": cache.manifest.get("templates", []),
        "template_set": cache.manifest.get("config", {}).get("templates"),
        "embed_dim": int(cache.manifest["embed_dim"]),
        "train_class_counts": cache.train_counts.tolist(),
        "eval_views": cache.manifest.get("eval_views", {"name": "center", "crops": 0}),  # val ranked with them
        **(extra or {}),
    }
    write_json(folder / ADAPTER_META, meta)
    return folder


def load_adapter(folder: str | Path, cache: FeatureCache) -> Adapter:
    """Read an adapter fitted on `cache` (safetensors only: nothing is unpickled).

    Raises:
        BalladError: missing, edited or malformed files, or a fit on another cache (naming both fingerprints).
    """
    folder = Path(folder)
    meta = read_json(folder / ADAPTER_META)
    if not isinstance(meta, dict):
        raise BalladError(f"{folder / ADAPTER_META} is not an adapter description (not a JSON object); refit it")
    try:
        config = AdapterConfig.from_dict(meta["config"])
        edited = "config_sha256" in meta and sha256_json(meta["config"]) != meta["config_sha256"]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BalladError(f"{folder / ADAPTER_META} has no valid config ({exc!s}); refit the adapter") from None
    if edited:
        raise BalladError(f"{folder / ADAPTER_META} was edited: its config does not match its config_sha256; refit")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise BalladError(f"{weights} does not exist; fit the adapter first")
    recorded = meta.get("weights_sha256")  # adapters written before it was recorded have none
    if recorded is not None and sha256_file(weights) != recorded:
        raise BalladError(f"{weights} does not match the sha256 in {ADAPTER_META} (changed); refit")
    state = read_tensors(weights, "refit it")
    if meta.get("cache_fingerprint") != cache.fingerprint:
        same_model = meta.get("model") == cache.manifest.get("model")
        why = "another extraction of the same model" if same_model else "a cache of another model"
        raise BalladError(
            f"adapter {folder} was fitted on cache {meta.get('cache_fingerprint')}, not {cache.fingerprint} "
            f"({why}); refit it on {cache.path}"
        )
    counts = meta.get("train_class_counts")
    if counts is not None and not (
        isinstance(counts, list)
        and len(counts) == cache.num_classes
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
    ):
        raise BalladError(
            f"{folder / ADAPTER_META}: train_class_counts is not {cache.num_classes} counts (edited?); refit it"
        )
    context = cache_context(cache, counts)
    head = load_head(config, state, context, weights, "refit it")
    return Adapter(head, config, str(meta.get("cache_fingerprint")), meta)
