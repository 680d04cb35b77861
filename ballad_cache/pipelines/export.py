"""From a phase-A model and an adapter to one classifier that plain open_clip loads.

The adapter is linear, `x' = ratio * W f + (1 - ratio) * f = M f` with `M = (1 - ratio) I + ratio W`, so it folds
into the image tower's last linear map: ViT `proj` (`proj <- proj @ Mᵀ`), ModifiedResNet's attention-pool output
projection and a timm tower's projection or classifier head (`weight <- M @ weight`, `bias <- M @ bias`). A timm
tower configured without a projection (`timm_proj: none`) gets one appended (`timm_proj: linear`, no bias, weight
`M`), which open_clip builds from the exported config. The exported model costs nothing extra at inference.

Beside the model (`open_clip_config.json`, `open_clip_model.safetensors`):

- `classifier.safetensors`: `text` (C×D, the class text embeddings of the adapter's cache, L2-normalised),
  `log_prior` (C, from the training counts the head was fitted with) and the head's own tensors as `head.NAME`
  (`Head.state` once folded: nothing for BALLAD's text head, `head.head` for a cosine head's rows, tip's
  `head.keys`/`head.values`/`head.class_weight`, gda's `head.weight`/`head.bias`, ncm's `head.prototypes`);
- `classifier.json`: format, class names, the head's name and `adapter_config`, logit scale, templates, ratio, the
  source model, adapter and cache fingerprint, training counts, shot-group thresholds and the eval views
  (`eval_views`: name, crops, expand) its cache was scored with, which `predict` makes again.

A head whose family folds nothing (the memory heads: they read the unchanged image features) keeps all its tensors.
`predict` loads the head back through its family, so every registered head exports without a line here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, read_json, remove_stale_temps, write_json
from ..errors import BalladError, setting
from ..heads.artifacts import ADAPTER_META, load_adapter, load_head, read_tensors, save_tensors
from ..heads.config import AdapterConfig
from ..heads.registry import Head, HeadContext
from ..inputs.longtail import ShotThresholds
from ..models.clip import (
    CLASS_HEAD_FILE,
    ClipModel,
    LoadedModel,
    load_model,
    local_dir,
    local_dir_config,
    local_dir_name,
    save_local_dir,
)
from ..models.tuned import TUNED_META, TUNER_WEIGHTS, is_tuned_dir
from ..store.cache import MANIFEST, FeatureCache
from ..store.runs import RunFolder

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"


CLASSIFIER_FORMAT = 2  # 2: the head's tensors as `head.NAME`, loaded by its family


@dataclass
class Classifier:
    """An image classifier: an open_clip model (the head's linear map folded into its image tower) and the head."""

    loaded: LoadedModel
    head: Head  # scores the tower's features (`HeadContext.folded`)
    context: HeadContext  # class text embeddings and training prior
    classnames: list[str]
    meta: dict[str, Any]

    @property
    def log_prior(self) -> torch.Tensor:
        """C, log of the training class frequencies."""
        return self.context.log_prior

    def score(self, features: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Class logits (CPU) of image features through the head (`Head.logits`, the scoring path `evaluate` and a
        sweep's ranking take too), adjusted by `tau` as `evaluate --tau` adjusts them (`HeadContext.adjusted`)."""
        return self.context.adjusted(self.head.logits(features).cpu(), tau)

    def logits(self, images: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Class logits of preprocessed images."""
        return self.score(self.loaded.model.encode_image(images).float(), tau)


def fold_adapter(model: ClipModel, model_cfg: dict[str, Any], matrix: torch.Tensor) -> tuple[ClipModel, dict[str, Any]]:
    """Fold `matrix` (D×D) into the image tower's last linear map; returns the model and its (maybe changed) config.

    Raises:
        BalladError: a tower whose output does not end in a linear map ballad knows how to fold into.
    """
    from ..anatomy import last_projection

    kind, target = last_projection(model)
    with torch.no_grad():
        if kind == "matrix":  # open_clip VisionTransformer: x @ proj
            target.copy_((target.double() @ matrix.T).to(target.dtype))
            return model, model_cfg
        if kind == "linear":
            _fold_linear(target, matrix)
            return model, model_cfg
        if kind == "none" and model_cfg.get("vision_cfg", {}).get("timm_proj") == "none":
            return _append_projection(model, model_cfg, matrix)
    reason = target if kind == "unsupported" else "its output does not end in a known linear map"
    raise BalladError(f"cannot fold the adapter into the image tower ({reason}); export is not supported")


def _fold_linear(layer: torch.nn.Linear, matrix: torch.Tensor) -> None:
    layer.weight.copy_((matrix @ layer.weight.double()).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((matrix @ layer.bias.double()).to(layer.bias.dtype))


def _append_projection(
    model: ClipModel, model_cfg: dict[str, Any], matrix: torch.Tensor
) -> tuple[ClipModel, dict[str, Any]]:
    """A timm tower without projection: rebuild it with a bias-free linear projection holding `matrix`."""
    import open_clip

    cfg = json.loads(json.dumps(model_cfg))
    cfg["vision_cfg"]["timm_proj"] = "linear"
    cfg["vision_cfg"]["timm_proj_bias"] = False
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    if cfg.get("text_cfg", {}).get("hf_model_name"):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    rebuilt = open_clip.model.CustomTextCLIP(**cfg) if cfg.get("custom_text") else open_clip.model.CLIP(**cfg)
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing != ["visual.head.proj.weight"]:
        raise BalladError(f"could not append a projection to the timm tower (missing {missing}, extra {unexpected})")
    with torch.no_grad():
        rebuilt.visual.head.proj.weight.copy_(matrix.float())
    return rebuilt.to(next(model.parameters()).device).eval(), cfg


def _model_cfg(loaded: LoadedModel) -> dict[str, Any]:
    import open_clip

    folder = local_dir(loaded.name)
    if folder is not None:
        return dict(local_dir_config(folder)["model_cfg"])
    cfg = open_clip.get_model_config(loaded.name)
    if cfg is None:
        raise BalladError(f"no open_clip config for model '{loaded.name}'")
    return json.loads(json.dumps(cfg))


def build_classifier(
    model: str, adapter: str | Path, pretrained: str | None = None, cache: str | Path | None = None
) -> Classifier:
    """Load `model`, fold the adapter in `adapter` into it, take class embeddings and counts from the adapter's cache.

    Args:
        model: the phase-A model the adapter's cache was extracted with (`local-dir:PATH` or an open_clip name).
        adapter: an adapter folder (fit-adapter's `--out` or sweep's `best/`).
        pretrained: open_clip pretrained tag or weights file, for named models.
        cache: the adapter's cache, when it moved from the path adapter.json records.

    Raises:
        BalladError: the adapter was fitted on a cache of another model (naming both), or its cache is missing.
    """
    meta = read_json(Path(adapter) / ADAPTER_META)
    cache_path = Path(cache) if cache else Path(str(meta.get("cache", "")))
    if not (cache_path / MANIFEST).exists():
        raise BalladError(
            f"the cache adapter {adapter} was fitted on ({cache_path}) is gone; pass {setting('cache')} with its new "
            "place"
        )
    feature_cache = FeatureCache(cache_path)
    fitted = load_adapter(adapter, feature_cache)
    loaded = load_model(model, pretrained)
    source = fitted.meta.get("model", {})
    if source.get("checkpoint_sha256") != loaded.checkpoint_sha256 or (
        source.get("checkpoint_sha256") is None and source.get("name") != loaded.name
    ):
        raise BalladError(
            f"adapter {adapter} was fitted on features of model {source.get('name')} "
            f"(weights {str(source.get('checkpoint_sha256'))[:12]}), not {loaded.name} "
            f"(weights {str(loaded.checkpoint_sha256)[:12]}); pass the model its cache was extracted with"
        )
    loaded.model = loaded.model.float().eval()
    folder = local_dir(model)
    tuned = folder if folder is not None and is_tuned_dir(folder) else None
    if tuned is not None:  # a tuned-model folder refers to its base's weights: the head stays outside the tower
        cfg: dict[str, Any] | None = None
        context = HeadContext(fitted.head.context.text, fitted.head.context.log_prior, folded=False)
        head = load_head(fitted.config, fitted.head.state(), context, Path(adapter), "refit it")
    else:
        matrix, folded = fitted.head.fold()
        cfg = _model_cfg(loaded)
        if matrix is not None:
            loaded.model, cfg = fold_adapter(loaded.model, cfg, matrix)
        context = HeadContext(fitted.head.context.text, fitted.head.context.log_prior, folded=True)
        head = load_head(fitted.config, folded.state(), context, Path(adapter), "refit it")  # as predict loads it
    thresholds = ShotThresholds()
    return Classifier(
        loaded=loaded,
        head=head,
        context=context,
        classnames=feature_cache.classnames,
        meta={
            "kind": "ballad-classifier",
            "format": CLASSIFIER_FORMAT,
            "classnames": feature_cache.classnames,
            "logit_scale": fitted.config.logit_scale,
            "head": fitted.config.head,
            "templates": feature_cache.manifest.get("templates", []),
            "ratio": fitted.config.ratio,
            "source_model": {"name": model, "pretrained": pretrained, **loaded.provenance()},
            "adapter": str(adapter),
            "adapter_config": fitted.config.to_dict(),
            "cache_fingerprint": feature_cache.fingerprint,
            "train_class_counts": fitted.meta.get("train_class_counts", feature_cache.train_counts.tolist()),
            "shot_thresholds": {"many": thresholds.many, "few": thresholds.few},
            "model_cfg": cfg,
            "folded": context.folded,
            # the eval views its cache was scored with: predict makes the same crops and averages their logits
            "eval_views": feature_cache.manifest.get("eval_views", {"name": "center", "crops": 0}),
            **({"tuned_source": str(tuned)} if tuned is not None else {}),
        },
    )


def export_folder(out: str | Path, overwrite: bool = False) -> RunFolder:
    """The run folder of `export`: a finished export is replaced only with `overwrite`."""
    return RunFolder(out, "export", (CLASSIFIER_META,), overwrite=overwrite)


def export_classifier(classifier: Classifier, out: str | Path) -> Path:
    """Write `classifier` as an open_clip local-dir model plus `classifier.safetensors` and `classifier.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    meta = dict(classifier.meta)
    cfg = meta.pop("model_cfg")
    source = meta.pop("tuned_source", None)
    if source is not None:  # the tuned-model folder's files: its base reference, tuner tensors and cosine head
        for name in (TUNED_META, TUNER_WEIGHTS, CLASS_HEAD_FILE):
            if (Path(source) / name).is_file():
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(Path(source) / name, tmp)
    else:
        save_local_dir(classifier.loaded, classifier.loaded.model, out, model_cfg=cfg)
    tensors = {"text": classifier.context.text, "log_prior": classifier.context.log_prior}
    tensors.update({f"head.{k}": v for k, v in classifier.head.state().items()})
    save_tensors(out / CLASSIFIER_WEIGHTS, tensors)
    write_json(out / CLASSIFIER_META, meta)  # written last: the export exists only when it does
    return out


def load_classifier(model: str, adapter: str | Path | None = None, pretrained: str | None = None) -> Classifier:
    """An exported classifier (`local-dir:E`), or `model` with `adapter` folded in on the fly.

    Raises:
        BalladError: `model` is no export (no classifier files) and no adapter was given, or the files are damaged.
    """
    if adapter is not None:
        return build_classifier(model, adapter, pretrained)
    folder = local_dir(model) or Path(model)
    if not (folder / CLASSIFIER_META).exists():
        raise BalladError(
            f"{folder} holds no {CLASSIFIER_META}: pass an exported model (ballad export) or add {setting('adapter')}"
        )
    meta = read_json(folder / CLASSIFIER_META)
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        raise BalladError(f"{folder / CLASSIFIER_META} is not a classifier of format {CLASSIFIER_FORMAT}; export again")
    tensors = read_tensors(folder / CLASSIFIER_WEIGHTS, "export again")
    try:
        text, log_prior = tensors["text"].float(), tensors["log_prior"].float()
        classnames = [str(c) for c in meta["classnames"]]
        config = AdapterConfig.from_dict(meta["adapter_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BalladError(f"{folder} lacks a valid {exc!s} in its classifier files; export again") from None
    if text.dim() != 2 or text.shape[0] != len(classnames) or log_prior.shape != (len(classnames),):
        raise BalladError(
            f"{folder / CLASSIFIER_WEIGHTS} holds text {tuple(text.shape)} and log_prior {tuple(log_prior.shape)} "
            f"for the {len(classnames)} classes {CLASSIFIER_META} lists; export again"
        )
    if not (torch.isfinite(text).all() and torch.isfinite(log_prior).all()):
        raise BalladError(f"{folder} holds NaN/Inf class embeddings or prior; export again")
    context = HeadContext(text, log_prior, folded=bool(meta.get("folded", True)))
    state = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    head = load_head(config, state, context, folder / CLASSIFIER_WEIGHTS, "export again")
    loaded = load_model(local_dir_name(folder))
    loaded.model.eval()
    if text.shape[1] != loaded.embed_dim:
        raise BalladError(f"{folder / CLASSIFIER_WEIGHTS} has dim {text.shape[1]}, the model {loaded.embed_dim}")
    return Classifier(loaded, head, context, classnames, meta)


def run_export(
    model: str,
    adapter: str | Path,
    out: str | Path,
    pretrained: str | None = None,
    cache: str | Path | None = None,
    overwrite: bool = False,
) -> Classifier:
    """`ballad export`: guard and lock `out`, fold the adapter into the model, write `config.json` and the export."""
    with export_folder(out, overwrite) as folder:
        classifier = build_classifier(model, adapter, pretrained, cache)
        folder.write_config(None, model=model, adapter=str(adapter), pretrained=pretrained)
        export_classifier(classifier, out)
    return classifier
