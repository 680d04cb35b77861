"""Phase A's output folder: a plain open_clip `local-dir` when the method folds, else a tuned-model folder.

A tuned-model folder (`adaptformer`, `vpt`) holds `ballad_tuned.json` (the method, its tuned towers and sizes, the
base model's name, tag and weights hash, the preprocessing) and `tuner.safetensors` (the method's tensors), and no
`open_clip_config.json`: plain open_clip refuses it loudly (no config) instead of quietly loading the base.
`load_model("local-dir:FOLDER")` loads the base, refuses one whose weights hash differs, and re-applies the method.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..anatomy import TOWERS
from ..atomic import atomic_path, read_json, sha256_file, write_json
from ..errors import BalladError
from ..tuning import METHODS, TuningOptions
from ..tuning.tuned import load_tuner_state, plain_state_dict, tune, tuner_state
from .clip import (
    FOLDER_LOADERS,
    ClassHead,
    LoadedModel,
    load_model,
    local_dir,
    local_dir_name,
    read_class_head,
    save_local_dir,
    write_class_head,
)

TUNED_META = "ballad_tuned.json"
TUNER_WEIGHTS = "tuner.safetensors"
TUNED_FORMAT = 1
_SIZES = ("num_classes", "rank", "bottleneck", "vpt_length")  # TuningOptions' integer sizes


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's plain weights (names, dtypes, shapes and bytes, in name order): what identifies the base
    a tuned-model folder was trained on, whether its weights came from a file, a tag or a seed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(plain_state_dict(model).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def base_reference(loaded: LoadedModel, sha256: str) -> dict[str, Any]:
    """What a tuned-model folder records of its base: name (a `local-dir:` path made absolute), tag, weights hash."""
    folder = local_dir(loaded.name)
    name = local_dir_name(os.path.abspath(folder)) if folder is not None else loaded.name
    pretrained = loaded.pretrained
    if pretrained and Path(pretrained).is_file():
        pretrained = os.path.abspath(pretrained)
    return {"name": name, "pretrained": pretrained, "weights_sha256": sha256}


def save_phase_a_model(
    loaded: LoadedModel,
    model: nn.Module,
    folder: str | Path,
    method: str,
    towers: list[str],
    options: TuningOptions,
    base: dict[str, Any] | None,
    head: ClassHead | None = None,
) -> Path:
    """Write phase A's model: merged into a plain open_clip folder when `method` folds (`full`, `bitfit`, `ssf`,
    `lora`), else a tuned-model folder referring to `base` (see `base_reference`). A cosine head is written beside
    it (`class_head.safetensors`). The folder's description file is written last."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if head is not None:
        write_class_head(folder, head)
    if METHODS.get(method).folds:
        state = None if method == "full" else plain_state_dict(model)
        return save_local_dir(loaded, model, folder, state=state)
    if base is None:
        raise ValueError(f"{method} does not fold: its folder needs the base model's reference")
    with atomic_path(folder / TUNER_WEIGHTS) as tmp:
        save_file(tuner_state(model), str(tmp))
    meta = {
        "format": TUNED_FORMAT,
        "method": method,
        "towers": towers,
        "options": asdict(options),
        "base": base,
        "preprocess_cfg": loaded.preprocess_cfg,
    }
    write_json(folder / TUNED_META, meta)
    return folder


def load_tuned_dir(folder: Path, device: str | torch.device = "cpu") -> LoadedModel | None:
    """A tuned-model folder loaded: its base loaded and checked against the recorded weights hash, the method
    re-applied and its tensors loaded; None when `folder` is not a tuned-model folder.

    Raises:
        BalladError: an unreadable description, an unknown method, a base whose weights differ from the recorded ones,
            or tuner tensors that do not fit.
    """
    from safetensors.torch import load_file

    meta_path = folder / TUNED_META
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != TUNED_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        newer = isinstance(found, int) and found > TUNED_FORMAT
        fix = "upgrade ballad to load it" if newer else "train the model again"
        raise BalladError(f"{meta_path} is of format {found}, not {TUNED_FORMAT}; {fix}")
    try:
        method, towers, options = meta["method"], list(meta["towers"]), TuningOptions(**meta["options"])
        base = meta["base"]
        base_name, base_tag, recorded = base["name"], base["pretrained"], base["weights_sha256"]
        sizes_ok = all(isinstance(getattr(options, f), int) and getattr(options, f) >= 0 for f in _SIZES)
        if not sizes_ok or options.num_classes < 1 or not set(towers) <= set(TOWERS) or not towers:
            raise ValueError("sizes or towers out of range")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"lacks {exc!s}" if isinstance(exc, KeyError) else f"holds an invalid description ({exc})"
        raise BalladError(f"{meta_path} {reason}; train the model again") from None
    if method not in METHODS:
        raise BalladError(
            f"{meta_path} was trained with method '{method}', which is not registered here; register it "
            "(ballad_cache.tuning.register_method) before loading"
        )
    loaded = load_model(base_name, base_tag, device)
    found = weights_sha256(loaded.model)
    if found != recorded:
        raise BalladError(
            f"{folder} was tuned on {base_name} with weights {recorded[:12]}, but those weights are now "
            f"{found[:12]}: load it on the base it was trained on (or train it again on this one)"
        )
    tune(loaded.model, method, towers, options)
    try:
        state = load_file(str(folder / TUNER_WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - a missing or damaged safetensors file
        raise BalladError(
            f"cannot read {folder / TUNER_WEIGHTS} ({type(exc).__name__}); train the model again"
        ) from None
    load_tuner_state(loaded.model, state, str(folder / TUNER_WEIGHTS))
    loaded.model.to(device).eval()
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    loaded.name = local_dir_name(folder)
    loaded.pretrained = None
    loaded.checkpoint_sha256 = sha256_file(folder / TUNER_WEIGHTS)
    loaded.class_head = read_class_head(folder)
    return loaded


def is_tuned_dir(folder: str | Path) -> bool:
    """Whether `folder` is a tuned-model folder (a method that does not fold)."""
    return (Path(folder) / TUNED_META).is_file()


FOLDER_LOADERS.register("tuned", load_tuned_dir, help="a tuned-model folder (adaptformer, vpt): base + tuner tensors")
