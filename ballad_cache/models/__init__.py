"""Models: CLIP through open_clip (registered architectures, loading, local-dir export, prompts), phase A's tuned
model folders, and the image encoder that extraction and prediction run."""

from .clip import (
    MODELS,
    ClipModel,
    LoadedModel,
    PromptBank,
    convert_weights_official,
    encode_text_tokens,
    list_models,
    load_model,
    local_dir,
    local_dir_config,
    local_dir_name,
    register_model,
    resolve_device,
    save_local_dir,
)
from .tuned import is_tuned_dir, load_tuned_dir, save_phase_a_model

__all__ = [
    "MODELS",
    "ClipModel",
    "LoadedModel",
    "PromptBank",
    "convert_weights_official",
    "encode_text_tokens",
    "list_models",
    "load_model",
    "local_dir",
    "local_dir_config",
    "local_dir_name",
    "register_model",
    "resolve_device",
    "save_local_dir",
    "is_tuned_dir",
    "load_tuned_dir",
    "save_phase_a_model",
]
