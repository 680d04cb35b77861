"""The configs of the pipelines (phase A, extraction, evaluation, prediction, the demo) with the registries their
choices come from, and the small configs of what each command reads and writes (`ModelSource`, `DatasetSource`,
`CacheSource`, `RunOutput`, `Placement`, ...); light to import (torch loads inside the registered functions), so the
CLI builds every option from them instantly. `AdapterConfig` lives beside the adapter (`heads/config.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import setting
from ..heads.terms import LOGIT_SCALE
from ..inputs.longtail import ShotThresholds
from ..inputs.splits import SPLITS
from ..inputs.transforms import AUGMENT_ON, AUGMENTATIONS, EVAL_VIEWS, LIFT_EXPAND
from ..options import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_HELP,
    OVERWRITE_HELP,
    OptionError,
    check_options,
    default_workers,
    option,
)
from ..registry import DEVICES, PRECISIONS, Registry
from ..schedules import SCHEDULES
from ..store.runs import SUMMARY
from ..tracking import REPORTERS
from ..tuning import METHODS

if TYPE_CHECKING:
    import torch

DATA = "fmnist-lt"  # the demo's embedded dataset (every other command requires --data)
MODEL = "ballad-lite"  # the demo's default: its image tower has seen images (bench/lite.py)
DEMO_MODELS = ("ballad-tiny", "ballad-lite")


def _sgd(params: list[torch.nn.Parameter], config: FinetuneConfig, fused: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=fused
    )


def _adamw(params: list[torch.nn.Parameter], config: FinetuneConfig, fused: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


OPTIMIZERS: Registry[Callable[[list[Any], Any, bool], Any]] = Registry("optimizer")
OPTIMIZERS.register("sgd", _sgd, help="SGD with momentum (official)")
OPTIMIZERS.register("adamw", _adamw, help="AdamW (--momentum unused)")


def _ce(
    image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, scale: float = LOGIT_SCALE, adjust: Any = None
) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(scale * image @ classes.T, labels)


def _la(
    image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, scale: float = LOGIT_SCALE, adjust: Any = 0.0
) -> torch.Tensor:
    import torch.nn.functional as F

    # LIFT `utils/losses.py` lines 84-94 (LogitAdjustedLoss): cross-entropy of logit + tau · log(class prior)
    return F.cross_entropy(scale * image @ classes.T + adjust, labels)


def _contrastive(
    image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, scale: float = LOGIT_SCALE, adjust: Any = None
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    captions = classes[labels]
    logits = scale * image @ captions.T
    target = torch.arange(len(labels), device=labels.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# (normalised image features, normalised class embeddings, labels, logit scale, tau · log prior) -> loss
PHASE_A_LOSSES: Registry[Callable[[Any, Any, Any, float, Any], Any]] = Registry("loss")
PHASE_A_LOSSES.register(
    "ce", _ce, help="cross-entropy over scale · image · class embeddingsᵀ (official, with --classifier prompts)"
)
PHASE_A_LOSSES.register(
    "la",
    _la,
    help="logit-adjusted cross-entropy: logits + --la-tau · log(train class prior) (LIFT's loss, tau 1)",
)
PHASE_A_LOSSES.register(
    "contrastive", _contrastive, help="the symmetric CLIP loss over the batch's image-caption pairs"
)

PHASE_A_CLASSIFIERS: Registry[str] = Registry("classifier")
PHASE_A_CLASSIFIERS.register(
    "prompts",
    "prompts",
    help="the class prompts' text embeddings, scale 100 (BALLAD); re-encoded each step while the text tower trains",
)
PHASE_A_CLASSIFIERS.register(
    "cosine",
    "cosine",
    help="a learned C×d cosine head initialised from the prompt embeddings, scale --cosine-scale (LIFT); saved "
    "with the model and used as the cache's class embeddings",
)


FINETUNE_PRECISIONS: Registry[str] = Registry("precision")  # PRECISIONS, plus the official fp16 weights
for _name in PRECISIONS:
    FINETUNE_PRECISIONS.register(_name, PRECISIONS.get(_name), help=PRECISIONS.help(_name))
FINETUNE_PRECISIONS.register(
    "fp16-official",
    "float16",
    help="the official code's weights: Conv, Linear and attention weights and both projections stored in float16 "
    "(openai/CLIP convert_weights; BatchNorm, LayerNorm, embeddings float32), float16 autocast, and SGD updating "
    "them in float16 with no float32 master copy, so updates below half an ulp of a weight are lost",
)


@dataclass
class FinetuneConfig:
    """Phase-A settings; defaults are the official BALLAD code's (`config/ImageNet_LT/clip_A_rn50.yaml`, `train.py`,
    `data/dataloader.py`) except fp32 weights (the official CLIP weights are fp16, trained without fp32 masters:
    `--precision fp16-official`; bench/fp16_official.py measures the difference)."""

    epochs: int = option(
        50, "Passes over the train split (official 50: BALLAD config/ImageNet_LT/clip_A_rn50.yaml line 26).", min=0
    )
    batch_size: int = option(
        512, "Global batch size, split over torchrun ranks (official 512: clip_A_rn50.yaml line 20).", min=1
    )
    lr: float = option(
        1e-5, "Peak learning rate (official: SGD 1e-5, BALLAD config/ImageNet_LT/clip_A_rn50.yaml line 12).", min=0.0
    )
    optimizer: str = option("sgd", "Optimizer.", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum (official 0.9: clip_A_rn50.yaml line 12).", min=0.0)
    weight_decay: float = option(5e-4, "Weight decay (official 5e-4: clip_A_rn50.yaml line 12).", min=0.0)
    schedule: str = option("epoch", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up over the first optimizer steps (not official).", min=0)
    keep_last_batch: bool = option(
        False,
        "Keep each epoch's last partial batch (ceil(N/B) steps); official: floor(N/B) full batches.",
        flag="--keep-last-batch/--drop-last-batch",
    )
    augment: str = option("official", "Training augmentation.", choices=AUGMENTATIONS)
    train_mode: bool = option(
        False,
        "Train with the model in train mode (BatchNorm statistics update, dropout on); official: eval mode.",
        flag="--train-mode/--eval-mode",
    )
    accum_steps: int = option(1, "Gradient accumulation: an optimizer step every N batches.", min=1)
    loss: str = option("ce", "Phase-A loss.", choices=PHASE_A_LOSSES)
    method: str = option(
        "full",
        "Tuning method: what trains in the tuned towers (LIFT's placement and sizes for all but full).",
        choices=METHODS,
    )
    tune_text: bool | None = option(
        None,
        "Apply the method to the text tower too (default: yes for full with --classifier prompts, as BALLAD trains "
        "both towers; no for the other methods, as LIFT freezes it, and with --classifier cosine).",
        flag="--tune-text/--freeze-text",
        axis=False,
    )
    classifier: str = option("prompts", "Phase-A classifier.", choices=PHASE_A_CLASSIFIERS)
    cosine_scale: float = option(
        25.0, "Logit scale of --classifier cosine (LIFT: 25, shijxcs/LIFT utils/config.py line 30).", above=0.0
    )
    la_tau: float = option(1.0, "tau of --loss la (LIFT: 1, shijxcs/LIFT utils/losses.py line 85).", min=0.0)
    head_lr: float | None = option(None, "Learning rate of the cosine head (default: --lr, as LIFT).", min=0.0)
    head_weight_decay: float | None = option(
        None, "Weight decay of the cosine head (default: --weight-decay, as LIFT).", min=0.0
    )
    lora_rank: int = option(
        0, "LoRA rank (0: LIFT's rule 2^floor(log2(C/2L)), shijxcs/LIFT models/peft_vit.py line 95).", min=0
    )
    lora_alpha: float = option(
        1.0, "LoRA scaling alpha / rank (LIFT: alpha 1, scaling 1/rank, models/peft_modules.py line 86).", above=0.0
    )
    bottleneck: int = option(
        0,
        "AdaptFormer bottleneck (0: LIFT's rule 2^floor(log2(C/2L)), shijxcs/LIFT models/peft_vit.py line 95).",
        min=0,
    )
    vpt_length: int = option(
        10, "Prompt tokens per block of --method vpt (LIFT: 10, models/peft_vit.py line 91).", min=1
    )
    vpt_shallow: bool = option(False, "VPT before the first block only (default: deep, before every block).")
    templates: str | None = option(
        None, "Prompt set: a registered set name, a .txt file, or '{c}' text (default: the dataset's templates)."
    )
    precision: str = option(
        "fp32",
        "Weights and matmul precision (official: fp16-official, the float16 weights BALLAD's CLIP loader makes: "
        "README, the precision row).",
        choices=FINETUNE_PRECISIONS,
    )
    seed: int = option(0, "Seeds sampling, augmentation and initialisation.", min=0)
    workers: int = option(default_factory=default_workers, help="DataLoader workers (default: cores - 1).", min=0)
    checkpoint_every: int = option(0, "Also checkpoint every N optimizer steps (0: only at epoch end).", min=0)
    log_every: int = option(10, "Log the mean loss every N batches (each read-back is a device sync).", min=1)
    max_steps: int = option(0, "Stop after N optimizer steps in total (0: no limit; smoke runs).", min=0)
    skip_bad: bool = option(False, f"Skip unreadable images (listed in {SUMMARY}) instead of stopping.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, MAX_PIXELS_HELP, min=1)

    def __post_init__(self) -> None:
        check_options(self)
        if self.precision == "fp16-official" and self.optimizer != "sgd":
            raise OptionError(
                "precision",
                f"fp16-official trains float16 weights with the official SGD; {setting('optimizer', self.optimizer)} "
                "keeps its state in float16 too, where AdamW's eps (1e-8) is 0 and the first step divides by zero",
            )

        if self.precision == "fp16-official" and self.method != "full":
            raise OptionError(
                "precision",
                f"fp16-official stores the whole model in float16 as BALLAD trains it; with "
                f"{setting('method', self.method)} use {setting('precision', 'fp32')} or "
                f"{setting('precision', 'bf16')}",
            )
        unread = [
            name
            for name in TUNING_FIELDS
            if name not in METHODS.get(self.method).reads and getattr(self, name) != _FINETUNE_DEFAULTS[name]
        ]
        if unread:
            raise OptionError(unread[0], f"is not read by {setting('method', self.method)}; drop it")
        if self.classifier != "cosine":
            for name in ("cosine_scale", "head_lr", "head_weight_decay"):
                if getattr(self, name) != _FINETUNE_DEFAULTS[name]:
                    raise OptionError(name, f"applies to {setting('classifier', 'cosine')} only; drop it")
        if self.loss != "la" and self.la_tau != _FINETUNE_DEFAULTS["la_tau"]:
            raise OptionError("la_tau", f"applies to {setting('loss', 'la')} only; drop it")
        if self.classifier == "cosine" and self.tune_text:
            raise OptionError(
                "tune_text",
                f"has nothing to train with {setting('classifier', 'cosine')}: the text tower only initialises the "
                f"head; drop it, or use {setting('classifier', 'prompts')}",
            )
        if self.classifier == "cosine" and self.loss == "contrastive":
            raise OptionError(
                "loss",
                f"contrastive pairs images with their class prompts' embeddings; with "
                f"{setting('classifier', 'cosine')} use {setting('loss', 'ce')} or {setting('loss', 'la')}",
            )

    @property
    def towers(self) -> list[str]:
        """The towers the method tunes: the image tower, and the text tower with `tune_text` (default: for full with
        the prompts classifier, as BALLAD; a cosine head never runs the text tower after its start)."""
        default = self.method == "full" and self.classifier == "prompts"
        text = default if self.tune_text is None else self.tune_text
        return ["image", "text"] if text else ["image"]

    def idle_reason(self) -> str | None:
        """Why this phase A would train nothing, or None."""
        if self.epochs == 0 or self.lr == 0:
            return "0 epochs or lr 0: the model is saved as loaded"
        if self.schedule == "epoch" and self.epochs == 1 and self.warmup_steps == 0:
            return (
                f"1 epoch with {setting('schedule', 'epoch')} runs at lr 0 (the official CosineAnnealingLR is stepped "
                f"at each epoch start): the model is saved as loaded; use {setting('epochs', 2)} or more, or "
                f"{setting('schedule', 'step')}"
            )
        return None


TUNING_FIELDS = ("lora_rank", "lora_alpha", "bottleneck", "vpt_length", "vpt_shallow")  # read per method
_FINETUNE_DEFAULTS = {
    f.name: f.default
    for f in fields(FinetuneConfig)
    if f.name in (*TUNING_FIELDS, "cosine_scale", "head_lr", "head_weight_decay", "la_tau")
}


DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    """What `ballad extract-features` computes; everything that changes the features is in the fingerprint."""

    splits: tuple[str, ...] = option(
        (), "Comma-separated splits to extract (default: every split the dataset has).", choices=SPLITS
    )
    # the official phase B augments every draw afresh; 16 cached views is the fewest within one std of that on
    # fmnist-lt (bench/fidelity.py, bench/RESULTS.md)
    train_views: int = option(
        16,
        "Augmented views per train image besides the eval view; phase B draws among them as the official code "
        "augments each draw (16: the fewest that match fresh views, bench/fidelity.py; 0: eval view only).",
        min=0,
    )
    augment: str = option("official", "Transform of the augmented train views.", choices=AUGMENTATIONS)
    # the device path is as accurate through phase B and faster in every measurement (bench/fidelity_device.md,
    # bench/extract_views.md, bench/demo_extract.md), so it is the default
    augment_on: str = option(
        "device",
        "Where the augmented train views (--train-views > 0) are made: 'device' (the loader workers decode each "
        "image once and draw each view's crop, flip and jitter as the PIL transform would; the pixels are made in "
        "batches on the encoding device) or 'worker' (PIL in the loader workers, as caches made before this option "
        "were). The two differ in rounding only; the fingerprint tells them apart, so a cache resumes only with the "
        "value it was made with.",
        choices=AUGMENT_ON,
    )
    eval_views: str = option(
        "center",
        "Eval views stored for val and test: the model's eval transform alone, or beside it LIFT's test-time crops "
        "(shijxcs/LIFT trainer.py lines 116-130), whose logits every scoring command then averages.",
        choices=EVAL_VIEWS,
    )
    eval_expand: int = option(
        LIFT_EXPAND,
        "Test-time crops are cut from the image resized to the model's size plus this (LIFT's expand: 24, "
        "utils/config.py line 56).",
        min=0,
    )
    templates: str | None = option(
        None, "Prompt set: a registered set name, a .txt file, or '{c}' text (default: the dataset's templates)."
    )
    # features are L2-normalised, so float16 loses about 1e-3 of cosine
    dtype: str = option("float16", "Feature dtype on disk.", choices=DTYPES)
    shard_size: int = option(16384, "Rows per shard: the unit of resume and the bound on memory.", min=1)
    batch_size: int = option(256, "Images per encoder batch.", min=1)
    workers: int = option(default_factory=default_workers, help="DataLoader workers (default: cores - 1).", min=0)
    seed: int = option(0, "Seeds the augmented views.", min=0)
    precision: str = option("fp32", "Matmul precision.", choices=PRECISIONS)
    skip_bad: bool = option(False, "Skip unreadable images (listed in the manifest) instead of stopping.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, MAX_PIXELS_HELP, min=1)
    draft: bool = option(
        False,
        "Decode JPEGs at 1/2 to 1/8 size in the decoder where the shorter side stays at least the model's input "
        "(twice it for augmented views): several times faster on large photos; pixels differ slightly from a full "
        "decode, so the cache's fingerprint records it.",
    )
    overwrite: bool = option(False, OVERWRITE_HELP + " Here: recompute finished shards.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class EvalConfig:
    """What `ballad evaluate` reports."""

    split: str = option("test", "Split to score.", choices=SPLITS)
    views: str | None = option(
        None,
        "Eval views to score, averaging each image's per-view logits (default: the views the cache holds; "
        "'center' scores view 0 of any cache).",
        choices=EVAL_VIEWS,
    )
    tau: float | None = option(None, "Post-hoc logit adjustment (Menon et al.): logits - tau * log prior.")
    knn: int | None = option(
        None, "Add a kNN head with K neighbours (faiss; a CUDA matmul when faiss has no GPU but torch does).", min=1
    )
    many: int = option(
        ShotThresholds.many,
        f"Shot groups: many-shot classes have more training images than this (BALLAD: {ShotThresholds.many}, "
        "OLTR utils.py shot_acc's many_shot_thr).",
        min=0,
    )
    plot: bool = option(False, "Also draw per-class accuracy against training count (needs --out).")
    few: int = option(
        ShotThresholds.few,
        f"Shot groups: few-shot classes have fewer training images than this (BALLAD: {ShotThresholds.few}, "
        "OLTR utils.py shot_acc's low_shot_thr).",
        min=0,
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.few > self.many:
            raise OptionError("few", f"({self.few}) must not exceed {setting('many')} ({self.many})")


FORMATS = ("csv", "jsonl")


@dataclass
class PredictConfig:
    """How `ballad predict` classifies and what it writes per image."""

    top_k: int = option(5, "Top-k class names and probabilities per image.", min=1)
    tau: float | None = option(None, "Post-hoc logit adjustment: logits - tau * log prior.")
    batch_size: int = option(256, "Images per encoder batch.", min=1)
    workers: int = option(default_factory=default_workers, help="DataLoader workers (default: cores - 1).", min=0)
    precision: str = option("fp32", "Matmul precision.", choices=PRECISIONS)
    skip_bad: bool = option(False, "List unreadable images in the output instead of stopping.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, MAX_PIXELS_HELP, min=1)
    format: str = option("csv", "Output format: csv or jsonl (JSON lines).", choices=FORMATS)
    split: str = option("test", "Split of --data to classify.", choices=SPLITS)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class DemoConfig:
    """What `ballad demo` runs."""

    size: str = option("full", "full (the README's run) or tiny (a few steps, for CI).", choices=("full", "tiny"))
    model: str = option(MODEL, "The demo model: ballad-lite, or ballad-tiny (random-init ViT).", choices=DEMO_MODELS)
    overwrite: bool = option(False, OVERWRITE_HELP + " Here: redo every step.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class Reporting:
    """Where a training command reports its run as it goes (`tracking.py`): never part of the run's config, so
    reporting changes no result and a resumed run may report elsewhere."""

    report_to: tuple[str, ...] = option(
        (),
        "Comma-separated viewers to report the run to as it goes (none by default); each is an extra: "
        "pip install 'ballad[tensorboard]' or 'ballad[wandb]'.",
        choices=REPORTERS,
    )
    run_name: str | None = option(None, "The run's name in the viewers (default: the output folder's name).")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class ReproduceConfig:
    """What `ballad reproduce` runs: the data root its recipe reads, and whether to run or only check and plan."""

    data: str | None = option(
        None, "Dataset root the recipe reads (see `ballad recipes`; the demo and CIFAR's $BALLAD_DATA need none)."
    )
    variant: tuple[str, ...] = option(
        (), "Comma-separated variants of the recipe to apply (the demo's: tiny, ballad-tiny; see the recipe file)."
    )
    dry_run: bool = option(
        False,
        "Run nothing: check the data against the published split and that the weights resolve, and print each "
        "stage's command with its estimated time, memory and disk on this device.",
    )

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class RecipeData:
    """The data root `ballad recipes` checks each recipe's dataset under."""

    data: str | None = option(None, "Dataset root to look for each recipe's data under (default: its own search).")

    def __post_init__(self) -> None:
        check_options(self)


# ---------------------------------------------------------------------------------------------- what commands read


@dataclass
class ModelSource:
    """The model a command loads: an open_clip name, a registered one or `local-dir:PATH`, and its weights."""

    model: str = option(help="open_clip name (ViT-B-16), a registered one (ballad-lite), or local-dir:PATH.")
    pretrained: str | None = option(None, "open_clip tag (openai, laion2b_...) or a weights file.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class DatasetSource:
    """The dataset a command reads, by spec."""

    # required: a command run on the user's work must not silently fall back to the demo's data (`demo` keeps it)
    data: str = option(help="Dataset spec: fmnist-lt, cifar100-lt:IF, folder:ROOT, wds:DIR, PATH.yaml.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class InfoFormat:
    """How an info command prints: a table for people, or JSON for scripts."""

    json: bool = option(False, "Print JSON on standard output (for scripts) instead of a table.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class CacheSource:
    """The feature cache a command reads."""

    cache: Path = option(help="A feature cache made by extract-features.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class Placement:
    """Where a command computes."""

    device: str = option("auto", "Where to compute.", choices=DEVICES)

    def __post_init__(self) -> None:
        check_options(self)


# ---------------------------------------------------------------------------------------------- what commands write


@dataclass
class RunOutput:
    """The run folder a command writes (`store.runs.RunFolder`): never written over without `overwrite`."""

    out: Path = option(help="Output folder (created; a finished run is kept unless --overwrite).")
    overwrite: bool = option(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class ResumableOutput(RunOutput):
    """A run folder whose unfinished run may be continued (phase A)."""

    resume: bool = option(False, "Continue from OUT/checkpoint.pt.")


@dataclass
class EvalFiles:
    """What `ballad evaluate` scores besides zero-shot, and where it writes its result (nowhere by default)."""

    adapter: Path | None = option(None, "Adapter folder (fit-adapter's or sweep's best/).")
    out: Path | None = option(None, "Write result.json, per_class.csv, plots.")
    overwrite: bool = option(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class ExportSource:
    """The fitted head `ballad export` folds into the model, and where its cache is now."""

    adapter: Path = option(help="Adapter folder (fit-adapter's --out, or sweep's best/).")
    cache: Path | None = option(None, "The adapter's cache, if it moved since the fit.")

    def __post_init__(self) -> None:
        check_options(self)


PLOTTED_PREDICTIONS = 25  # images in `predict --plot`'s grid


@dataclass
class PredictFiles:
    """What `ballad predict` classifies besides image paths (a dataset split), with what head, and where it writes."""

    out: Path = option(help="Predictions file (CSV or JSON lines).")
    data: str | None = option(None, "Classify a dataset split instead (with labels).")
    adapter: Path | None = option(None, "Fold this adapter into --model on the fly.")
    plot: Path | None = option(
        None,
        f"Also draw the first {PLOTTED_PREDICTIONS} predictions as a grid of images (PNG; true class in green or red).",
    )
    overwrite: bool = option(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class DemoFolder:
    """Where `ballad demo` writes (each step in a subfolder)."""

    out: Path = option(Path("ballad-demo"), "Demo folder; each step gets a subfolder.")

    def __post_init__(self) -> None:
        check_options(self)
