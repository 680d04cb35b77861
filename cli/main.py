"""`ballad`: BALLAD long-tailed recognition with CLIP; phase B, evaluation and sweeps run on cached features.

ballad finetune --data fmnist-lt --model ballad-tiny --out runs/phase-a
ballad extract-features --data fmnist-lt --model local-dir:runs/phase-a/model --out runs/cache
ballad fit-adapter --cache runs/cache --out runs/adapter --ratio 0.2
ballad evaluate --cache runs/cache --adapter runs/adapter --out runs/eval --tau 1.0 --plot
ballad sweep --cache runs/cache --out runs/sweep --ratio 0.1,0.2,0.4 --lr 0.05,0.2
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .ui import DEBUG, RichProgress, err, handle_errors, out, report_table

T = TypeVar("T")

app = typer.Typer(
    help="BALLAD long-tailed recognition with CLIP: finetune once, cache features, fit adapters in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(help="Inspect and check feature caches.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Sampler(str, Enum):
    class_aware = "class-aware"
    sqrt = "sqrt"
    instance = "instance"
    progressive = "progressive"


class Schedule(str, Enum):
    epoch = "epoch"
    step = "step"


class Select(str, Enum):
    best_val = "best-val"
    last = "last"


ScheduleOpt = Annotated[
    Schedule,
    typer.Option(
        help="epoch: cosine over epochs, stepped at each epoch start, the last epoch at lr 0 (official); "
        "step: per-step cosine."
    ),
]
KeepLastOpt = Annotated[
    bool,
    typer.Option(
        "--keep-last-batch/--drop-last-batch",
        help="Keep each epoch's last partial batch (ceil(N/B) steps); official: floor(N/B) full batches.",
    ),
]
SelectOpt = Annotated[
    Select,
    typer.Option(help="Weights kept: best-val (the epoch with the best val top-1, official) or last."),
]


class Loss(str, Enum):
    ce = "ce"
    la = "la"


class Head(str, Enum):
    text = "text"
    cosine = "cosine"


HeadScaleOpt = Annotated[float, typer.Option(min=1e-6, help="Logit scale of the cosine head (LIFT: 25).")]
HeadLrOpt = Annotated[float | None, typer.Option(min=0.0, help="Cosine head's learning rate [default: --lr].")]


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


DataOpt = Annotated[
    str, typer.Option("--data", help="Dataset spec: fmnist-lt, cifar100-lt:100, folder:ROOT, PATH.yaml.")
]
ModelOpt = Annotated[
    str, typer.Option("--model", help="open_clip name (ViT-B-16), ballad-lite, ballad-tiny, or local-dir:PATH.")
]
PretrainedOpt = Annotated[
    str | None, typer.Option("--pretrained", help="open_clip tag (openai, laion2b_...) or a weights file.")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto picks CUDA when torch sees a GPU.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds sampling, augmentation and initialisation.")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="A feature cache made by extract-features.")]


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")] = False,
) -> None:
    """Set global flags."""
    if debug:
        DEBUG["on"] = True


def _csv(value: str, cast: type, option: str) -> list[Any]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter("the grid is empty; give comma-separated values", param_hint=option)
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise typer.BadParameter(
            f"'{value}' is not a comma-separated list of {cast.__name__}", param_hint=option
        ) from None


def _device(device: Device) -> Any:
    from ballad_cache.models import resolve_device

    return resolve_device(device.value)


def _save_config(folder: Path, command: str, config: Any, **extra: Any) -> None:
    from dataclasses import asdict

    from ballad_cache import __version__
    from ballad_cache.atomic import write_json

    write_json(folder / "config.json", {"command": command, "ballad": __version__, **extra, "config": asdict(config)})


# ---------------------------------------------------------------------------------------------- phase A


@app.command()
@handle_errors
def finetune(
    data: DataOpt = "fmnist-lt",
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: model/, checkpoint.pt, metrics.jsonl.")] = Path(
        "runs/finetune"
    ),
    epochs: Annotated[int, typer.Option(min=0, help="Passes over the train split (official 50).")] = 50,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (official: SGD 1e-5).")] = 1e-5,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Global batch size, split over torchrun ranks (official 512).")
    ] = 512,
    optimizer: Annotated[str, typer.Option(help="sgd (official) or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    schedule: ScheduleOpt = Schedule.epoch,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps (not official).")] = 0,
    keep_last_batch: KeepLastOpt = False,
    augment: Annotated[
        str,
        typer.Option(
            help="official: RandomResizedCrop(scale 0.5-1) + flip + ColorJitter(0.4, 0.4, 0.4); "
            "open_clip: the model's preprocess_train (crop scale 0.9-1)."
        ),
    ] = "official",
    train_mode: Annotated[
        bool,
        typer.Option(
            "--train-mode/--eval-mode",
            help="Train with the model in train mode (BatchNorm statistics update, dropout on); official: eval mode.",
        ),
    ] = False,
    accum_steps: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    loss: Annotated[str, typer.Option(help="ce (over class prompts, official) or contrastive.")] = "ce",
    templates: Annotated[
        str | None,
        typer.Option(
            help="Prompt set: ballad, openai-imagenet, a .txt, or '{c}' text [default: the dataset YAML's "
            "templates, else ballad]."
        ),
    ] = None,
    precision: Annotated[Precision, typer.Option(help="bf16 autocast on GPU.")] = Precision.fp32,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Also checkpoint every N steps.")] = 0,
    log_every: Annotated[
        int, typer.Option(min=1, help="Log the mean loss every N batches (each read-back is a device sync).")
    ] = 10,
    max_steps: Annotated[int, typer.Option(min=0, help="Stop after N optimizer steps (0: no limit).")] = 0,
    workers: Annotated[int | None, typer.Option(min=0, help="DataLoader workers (default: cores - 1).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images instead of stopping.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Reuse an existing run folder.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
) -> None:
    """Phase A: continue training both CLIP towers on the long-tailed train split (BALLAD's recipe).

    Runs under `torchrun --nproc_per_node=N ballad finetune ...` for DDP (NCCL on GPU, gloo on CPU).
    """
    from ballad_cache.atomic import RunLock, prepare_run_dir
    from ballad_cache.datasets import load_dataset
    from ballad_cache.distributed import cleanup_distributed, init_distributed
    from ballad_cache.finetune import FinetuneConfig
    from ballad_cache.finetune import finetune as run_finetune
    from ballad_cache.models import load_model

    config = _config(
        FinetuneConfig,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        schedule=schedule.value,
        warmup_steps=warmup_steps,
        keep_last_batch=keep_last_batch,
        augment=augment,
        train_mode=train_mode,
        accum_steps=accum_steps,
        loss=loss,
        templates=templates,
        precision=precision.value,
        seed=seed,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        max_steps=max_steps,
        skip_bad=skip_bad,
        workers=workers,
    )
    dist, dev = init_distributed(_device(device))
    try:
        if dist.is_main:
            prepare_run_dir(out_dir, overwrite, resume, finished=("summary.json", "checkpoint.pt", "model"))
        dist.barrier()
        dataset = load_dataset(data)
        loaded = load_model(model, pretrained)
        with RunLock(out_dir) if dist.is_main else _nolock(), RichProgress() as progress:
            if dist.is_main and not resume:
                _save_config(out_dir, "finetune", config, data=data, model=model, pretrained=pretrained)
            result = run_finetune(dataset, loaded, out_dir, config, dev, dist, resume=resume, progress=progress)
        if dist.is_main:
            start = result["start"]["top1"] if result["start"] else float("nan")
            out.print(
                f"phase A done: val top1 {start:.2f} -> {result['best_val_top1']:.2f} (epoch {result['best_epoch']}); "
                f"model: {out_dir / 'model'}"
            )
            if result["skipped"]:
                out.print(f"skipped {len(result['skipped'])} unreadable training image(s); listed in summary.json")
    finally:
        cleanup_distributed()


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------- extraction


@app.command("extract-features")
@handle_errors
def extract_features(
    data: DataOpt = "fmnist-lt",
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Cache folder.")] = Path("runs/cache"),
    splits: Annotated[
        str | None, typer.Option(help="Comma-separated splits to extract [default: every split the dataset has].")
    ] = None,
    train_views: Annotated[
        int,
        typer.Option(
            min=0,
            help="Augmented views per train image besides the eval view; phase B draws among them as the official "
            "code augments each draw (16: the fewest that match fresh views, bench/fidelity.py; 0: eval view only).",
        ),
    ] = 16,
    templates: Annotated[
        str | None,
        typer.Option(
            help="Prompt set: ballad, openai-imagenet, a .txt, or '{c}' text [default: the dataset YAML's "
            "templates, else ballad]."
        ),
    ] = None,
    augment: Annotated[
        str,
        typer.Option(
            help="Transform of the augmented train views: official (BALLAD's RandomResizedCrop 0.5-1 + flip + "
            "ColorJitter 0.4) or open_clip (the model's preprocess_train)."
        ),
    ] = "official",
    dtype: Annotated[str, typer.Option(help="Feature dtype on disk: float16 or float32.")] = "float16",
    shard_size: Annotated[int, typer.Option(min=1, help="Rows per shard (unit of resume).")] = 16384,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="DataLoader workers (default: cores - 1).")] = None,
    precision: Annotated[Precision, typer.Option(help="bf16 autocast on GPU.")] = Precision.fp32,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images (listed in the manifest).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Recompute shards that are already complete.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
) -> None:
    """Encode images once with the frozen model into HDF5 shards; reruns skip finished shards.

    Runs under `torchrun --nproc_per_node=N`: each rank writes its own shards, rank 0 the manifest.
    """
    from ballad_cache.atomic import RunLock
    from ballad_cache.datasets import load_dataset
    from ballad_cache.distributed import cleanup_distributed, init_distributed
    from ballad_cache.extract import ExtractConfig, resolve_splits
    from ballad_cache.extract import extract_features as run_extract
    from ballad_cache.models import load_model

    config = _config(
        ExtractConfig,
        splits=tuple(_csv(splits, str, "--splits")) if splits else (),
        train_views=train_views,
        augment=augment,
        templates=templates,
        dtype=dtype,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        precision=precision.value,
        skip_bad=skip_bad,
        overwrite=overwrite,
        workers=workers,
    )
    dist, dev = init_distributed(_device(device))
    try:
        dataset = load_dataset(data)
        config = resolve_splits(config, dataset)
        loaded = load_model(model, pretrained)
        with RunLock(out_dir, f".ballad.rank{dist.rank}.lock"), RichProgress() as progress:
            if dist.is_main:
                _save_config(out_dir, "extract-features", config, data=data, model=model, pretrained=pretrained)
            manifest = run_extract(dataset, loaded, out_dir, config, dev, dist, progress)
        if manifest is not None:
            rows = ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())
            skipped = f"; skipped {len(manifest['skipped'])} bad image(s)" if manifest["skipped"] else ""
            out.print(
                f"cache {out_dir}: {rows} rows, dim {manifest['embed_dim']}, "
                f"fingerprint {manifest['fingerprint']}{skipped}"
            )
    finally:
        cleanup_distributed()


@cache_app.command("info")
@handle_errors
def cache_info(cache: Annotated[Path, typer.Argument(help="Cache folder.")]) -> None:
    """Splits, rows, dims, model, fingerprint and size on disk."""
    from rich.table import Table

    from ballad_cache.cache import FeatureCache

    c = FeatureCache(cache)
    m = c.manifest
    table = Table(title=f"cache {cache}")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("views", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("shards", justify="right")
    for s, v in m["splits"].items():
        table.add_row(s, str(v["images"]), str(v["views"]), str(v["rows"]), str(len(v["shards"])))
    out.print(table)
    model = m["model"]
    out.print(f"model: {model['name']} pretrained={model['pretrained']} sha256={str(model['checkpoint_sha256'])[:12]}")
    out.print(f"dataset: {m['dataset']}  classes: {len(m['classnames'])}  templates: {len(m['templates'])}")
    out.print(
        f"dim: {m['embed_dim']}  dtype: {m['dtype']}  fingerprint: {m['fingerprint']}  "
        f"size: {c.size_on_disk() / 2**20:.1f} MiB  skipped images: {len(m['skipped'])}"
    )


@cache_app.command("verify")
@handle_errors
def cache_verify(cache: Annotated[Path, typer.Argument(help="Cache folder.")]) -> None:
    """Re-hash every shard against the manifest; exit 1 naming the first bad one."""
    from ballad_cache.cache import FeatureCache

    checked = FeatureCache(cache).verify()
    out.print(f"ok: {len(checked)} files match the manifest of {cache}")


# ---------------------------------------------------------------------------------------------- phase B


def _config(cls: type[T], **options: Any) -> T:
    """A library config from option values: None keeps the config's default, invalid values exit 2."""
    try:
        return cls(**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("fit-adapter")
@handle_errors
def fit_adapter(
    cache: CacheOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Adapter folder: adapter.safetensors + adapter.json.")],
    ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="Residual mix: ratio * W f + (1 - ratio) * f.")] = 0.2,
    sampler: Annotated[Sampler, typer.Option(help="Index stream.")] = Sampler.class_aware,
    samples_per_class: Annotated[int, typer.Option(min=1, help="Consecutive draws per class (class-aware).")] = 4,
    epochs: Annotated[int, typer.Option(min=0, help="Epochs of floor(N/B) batches (N training images).")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="SGD learning rate (official 0.2).")] = 0.2,
    momentum: Annotated[float, typer.Option(min=0.0)] = 0.9,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 512,
    schedule: ScheduleOpt = Schedule.epoch,
    keep_last_batch: KeepLastOpt = False,
    select: SelectOpt = Select.best_val,
    loss: Annotated[
        Loss, typer.Option(help="ce (BALLAD) or la: logit-adjusted CE, logits + la_tau * log prior (Menon et al.).")
    ] = Loss.ce,
    la_tau: Annotated[float, typer.Option(help="Logit-adjustment strength of --loss la.")] = 1.0,
    head: Annotated[
        Head,
        typer.Option(
            help="text: the fixed class text embeddings (BALLAD); cosine: a learnable classifier initialised from "
            "them (LIFT), trained with the adapter (--ratio 0 trains the head alone)."
        ),
    ] = Head.text,
    head_scale: HeadScaleOpt = 25.0,
    head_lr: HeadLrOpt = None,
    precision: Annotated[
        Precision,
        typer.Option(help="bf16: bfloat16 matmuls, fp32 loss and optimizer state (GPU, or a CPU with native bf16)."),
    ] = Precision.fp32,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter in --out.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
) -> None:
    """Phase B: train BALLAD's residual linear adapter on cached features (class-balanced by default)."""
    from ballad_cache.adapter import AdapterConfig
    from ballad_cache.atomic import RunLock, prepare_run_dir
    from ballad_cache.cache import FeatureCache
    from ballad_cache.phase_b import fit_on_cache

    config = _config(
        AdapterConfig,
        ratio=ratio,
        sampler=sampler.value,
        samples_per_class=samples_per_class,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        schedule=schedule.value,
        keep_last_batch=keep_last_batch,
        select=select.value,
        loss=loss.value,
        la_tau=la_tau,
        head=head.value,
        head_scale=head_scale,
        head_lr=head_lr,
        seed=seed,
    )
    c = FeatureCache(cache)
    prepare_run_dir(out_dir, overwrite, finished=("adapter.json", "adapter.safetensors"))
    with RunLock(out_dir), RichProgress() as progress:
        _save_config(out_dir, "fit-adapter", config, cache=str(cache), cache_fingerprint=c.fingerprint)
        meta = fit_on_cache(c, config, out_dir, _device(device), progress, precision.value)
    if "val" in meta:
        out.print(report_table(f"adapter {out_dir} on val", [("adapter", meta["val"])]))
    out.print(
        f"adapter written to {out_dir} ({meta['steps']} steps, kept epoch {meta['best_epoch']}, "
        f"{meta['train_seconds']:.1f}s)"
    )


@app.command()
@handle_errors
def evaluate(
    cache: CacheOpt,
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter folder (fit-adapter's --out, or sweep's best/).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write result.json, per_class.csv, plots.")] = None,
    tau: Annotated[float | None, typer.Option(help="Post-hoc logit adjustment: logits - tau * log prior.")] = None,
    knn: Annotated[
        int | None,
        typer.Option(
            min=1, help="Add a kNN head with K neighbours (faiss; a CUDA matmul when faiss has no GPU but torch does)."
        ),
    ] = None,
    plot: Annotated[bool, typer.Option(help="Per-class accuracy vs training count PNG (needs --out).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing result in --out.")] = False,
) -> None:
    """Zero-shot and adapter accuracy on cached features: top-1/5, many/medium/few, per class."""
    from ballad_cache.adapter import load_adapter
    from ballad_cache.atomic import prepare_run_dir
    from ballad_cache.cache import FeatureCache
    from ballad_cache.evaluate import EvalConfig, evaluate_cache, summary_rows, write_result

    c = FeatureCache(cache)
    ad = load_adapter(adapter, c) if adapter else None
    config = EvalConfig(split=split, tau=tau, knn=knn)
    result = evaluate_cache(c, ad, config)
    out.print(report_table(f"{split} accuracy (%) on {cache}", summary_rows(result)))
    if out_dir is not None:
        prepare_run_dir(out_dir, overwrite, finished=("result.json",))
        _save_config(out_dir, "evaluate", config, cache=str(cache), adapter=str(adapter) if adapter else None)
        paths = write_result(result, out_dir, plot=plot)
        err.print("wrote " + ", ".join(str(p) for p in paths))
    elif plot:
        raise typer.BadParameter("--plot needs --out", param_hint="--plot")


@app.command()
@handle_errors
def sweep(
    cache: CacheOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Sweep folder: results.csv/json, best/, heatmap.png.")],
    ratio: Annotated[str, typer.Option(help="Comma-separated ratios in [0, 1].")] = "0.1,0.2,0.4",
    sampler: Annotated[str, typer.Option(help="Comma-separated samplers.")] = "class-aware",
    lr: Annotated[str, typer.Option(help="Comma-separated learning rates.")] = "0.2",
    epochs: Annotated[str, typer.Option(help="Comma-separated epoch counts.")] = "10",
    weight_decay: Annotated[str, typer.Option(help="Comma-separated weight decays.")] = "5e-4",
    loss: Annotated[str, typer.Option(help="Comma-separated losses: ce (BALLAD), la (logit-adjusted).")] = "ce",
    la_tau: Annotated[str, typer.Option(help="Comma-separated logit-adjustment strengths (for la).")] = "1.0",
    head: Annotated[str, typer.Option(help="Comma-separated heads: text (BALLAD), cosine (LIFT).")] = "text",
    head_scale: HeadScaleOpt = 25.0,
    head_lr: HeadLrOpt = None,
    precision: Annotated[
        Precision,
        typer.Option(help="bf16: bfloat16 matmuls, fp32 loss and optimizer state (GPU, or a CPU with native bf16)."),
    ] = Precision.fp32,
    batch_size: Annotated[int, typer.Option(min=1)] = 512,
    schedule: ScheduleOpt = Schedule.epoch,
    keep_last_batch: KeepLastOpt = False,
    select: SelectOpt = Select.best_val,
    metric: Annotated[str, typer.Option(help="Val metric to rank by: top1, many, medium, few.")] = "top1",
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
) -> None:
    """Train a grid of adapters in one process (shared index streams batched), rank on val, keep the best.

    A rerun into the same --out skips finished points.
    """
    from ballad_cache.adapter import AdapterConfig
    from ballad_cache.atomic import RunLock
    from ballad_cache.cache import FeatureCache
    from ballad_cache.phase_b import expand_grid, run_sweep
    from ballad_cache.samplers import SAMPLERS

    ratios = _csv(ratio, float, "--ratio")
    if any(not 0 <= r <= 1 for r in ratios):
        raise typer.BadParameter("ratios must be in [0, 1]", param_hint="--ratio")
    samplers = _csv(sampler, str, "--sampler")
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise typer.BadParameter(
            f"unknown sampler '{unknown[0]}'; known: {', '.join(SAMPLERS)}", param_hint="--sampler"
        )
    lrs, eps, wds = _csv(lr, float, "--lr"), _csv(epochs, int, "--epochs"), _csv(weight_decay, float, "--weight-decay")
    if any(e < 0 for e in eps):
        raise typer.BadParameter("epochs must be >= 0", param_hint="--epochs")
    losses, heads, taus = _csv(loss, str, "--loss"), _csv(head, str, "--head"), _csv(la_tau, float, "--la-tau")
    for values, known, option in ((losses, ("ce", "la"), "--loss"), (heads, ("text", "cosine"), "--head")):
        if any(v not in known for v in values):
            raise typer.BadParameter(f"use {' or '.join(known)}", param_hint=option)
    if "la" not in losses:
        taus = []  # the strength only matters for la
    base = _config(
        AdapterConfig,
        batch_size=batch_size,
        head_scale=head_scale,
        head_lr=head_lr,
        schedule=schedule.value,
        keep_last_batch=keep_last_batch,
        select=select.value,
        seed=seed,
    )
    configs = expand_grid(
        base, sampler=samplers, ratio=ratios, lr=lrs, epochs=eps, weight_decay=wds, loss=losses, head=heads
    )
    if taus:  # la points take each strength; ce points stay one each
        configs = [
            AdapterConfig.from_dict({**c.to_dict(), "la_tau": t})
            for c in configs
            for t in (taus if c.loss == "la" else [c.la_tau])
        ]
    c = FeatureCache(cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir), RichProgress() as progress:
        from ballad_cache.atomic import write_json

        write_json(
            out_dir / "config.json",
            {"command": "sweep", "cache": str(cache), "metric": metric, "grid": [cfg.to_dict() for cfg in configs]},
        )
        result = run_sweep(c, configs, out_dir, metric, _device(device), progress, precision.value)
    rows = [(_point_name(p["config"]), p["val"]) for p in result.points[:10]]
    out.print(report_table(f"sweep on val (top {len(rows)} of {len(result.points)}, ranked by {metric})", rows))
    if result.test:
        out.print(report_table("best configuration on test", [("best", result.test)]))
    out.print(f"best adapter: {out_dir / 'best'}; results: {out_dir / 'results.csv'}")


# ---------------------------------------------------------------------------------------------- the classifier


@app.command()
@handle_errors
def export(
    model: ModelOpt,
    adapter: Annotated[
        Path, typer.Option(help="Adapter folder fitted on a cache of --model (fit-adapter or sweep best/).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Export folder: open_clip local-dir + classifier files.")],
    pretrained: PretrainedOpt = None,
    cache: Annotated[
        Path | None, typer.Option(help="The adapter's cache, if it moved from where adapter.json says it is.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export in --out.")] = False,
) -> None:
    """Fold the adapter into the model's image tower and write one classifier that plain open_clip loads.

    Load it with `open_clip.create_model_and_transforms("local-dir:OUT")`; the class embeddings and the log prior
    are in OUT/classifier.safetensors, class names and provenance in OUT/classifier.json.
    """
    from ballad_cache.atomic import RunLock, prepare_run_dir
    from ballad_cache.export import CLASSIFIER_META, build_classifier, export_classifier

    prepare_run_dir(out_dir, overwrite, finished=(CLASSIFIER_META,))
    classifier = build_classifier(model, adapter, pretrained, cache)
    with RunLock(out_dir):
        export_classifier(classifier, out_dir)
    out.print(
        f"exported {len(classifier.classnames)}-class classifier to {out_dir} (adapter ratio "
        f"{classifier.meta['ratio']:g} folded into the image tower); load it with "
        f"open_clip.create_model_and_transforms('local-dir:{out_dir}')"
    )


class OutputFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


@app.command()
@handle_errors
def predict(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders (recursive) or .txt lists of paths.")
    ] = None,
    model: ModelOpt = "local-dir:runs/export",
    adapter: Annotated[
        Path | None, typer.Option(help="Fold this adapter in on the fly (--model is then the phase-A model).")
    ] = None,
    pretrained: PretrainedOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Classify a dataset split instead (with labels).")] = None,
    split: Annotated[str, typer.Option(help="Split of --data.")] = "test",
    out_file: Annotated[Path, typer.Option("--out", help="Predictions file.")] = Path("preds.csv"),
    fmt: Annotated[OutputFormat, typer.Option("--format", help="csv or jsonl (JSON lines).")] = OutputFormat.csv,
    top_k: Annotated[int, typer.Option(min=1, help="Top-k class names and probabilities per image.")] = 5,
    tau: Annotated[float | None, typer.Option(help="Logit adjustment: logits - tau * log prior.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="DataLoader workers (default: cores - 1).")] = None,
    precision: Annotated[Precision, typer.Option(help="bf16 autocast on GPU.")] = Precision.fp32,
    skip_bad: Annotated[bool, typer.Option(help="List unreadable images in the output instead of stopping.")] = False,
    device: DeviceOpt = Device.auto,
) -> None:
    """Classify images with an exported classifier (or a model plus --adapter); with labels, print the accuracy."""
    from ballad_cache.datasets import load_dataset
    from ballad_cache.export import load_classifier
    from ballad_cache.predict import PredictConfig, collect_images, predict_split, write_predictions

    if bool(inputs) == bool(data):
        raise typer.BadParameter("give image paths or --data SPEC (one of them)", param_hint="INPUTS / --data")
    config = _config(
        PredictConfig,
        top_k=top_k,
        tau=tau,
        batch_size=batch_size,
        workers=workers,
        precision=precision.value,
        skip_bad=skip_bad,
    )
    images = load_dataset(data).split(split) if data else collect_images(list(inputs or []))
    classifier = load_classifier(model, adapter, pretrained)
    with RichProgress() as progress:
        result = predict_split(classifier, images, config, _device(device), progress)
    write_predictions(result, out_file, fmt.value, top_k)
    if result.report:
        out.print(report_table(f"{len(result.rows)} images ({data} {split})", [("classifier", result.report)]))
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable image(s); listed in {out_file}")
    out.print(f"{len(result.rows)} predictions written to {out_file} ({result.images_per_s:.0f} images/s)")


def _point_name(c: dict[str, Any]) -> str:
    name = f"{c['sampler']} r={c['ratio']:g} lr={c['lr']:g} e={c['epochs']}"
    if c.get("loss") == "la":
        name += f" la{c['la_tau']:g}"
    if c.get("head") == "cosine":
        name += " cos"
    return name


# ---------------------------------------------------------------------------------------------- the rest


@data_app.command("info")
@handle_errors
def data_info(spec: Annotated[str, typer.Argument(help="Dataset spec.")] = "fmnist-lt") -> None:
    """Class counts, imbalance factor and many/medium/few groups of a dataset's train split."""
    from rich.table import Table

    from ballad_cache.datasets import load_dataset
    from ballad_cache.longtail import GROUP_NAMES, group_sizes, imbalance_factor, shot_groups

    ds = load_dataset(spec)
    counts = ds.class_counts("train")
    groups = shot_groups(counts)
    table = Table(title=f"{ds.name}: train class counts")
    table.add_column("class", justify="right")
    table.add_column("name")
    table.add_column("train", justify="right")
    table.add_column("group")
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    shown = order if len(order) <= 40 else order[:20] + order[-20:]
    for c in shown:
        table.add_row(str(c), ds.classnames[c], str(counts[c]), GROUP_NAMES[groups[c]])
    out.print(table)
    sizes = group_sizes(counts)
    split_sizes = ", ".join(f"{s} {len(v)}" for s, v in ds.splits.items())
    out.print(
        f"{ds.num_classes} classes, {int(counts.sum())} train images ({counts.max()} ... {counts.min()}), "
        f"imbalance factor {imbalance_factor(counts):.1f}"
    )
    out.print(
        f"groups: {sizes['many']} many / {sizes['medium']} medium / {sizes['few']} few "
        f"(many > 100, few < 20); splits: {split_sizes}"
    )


@app.command()
@handle_errors
def models() -> None:
    """List model names: ballad's built-ins, then open_clip's (use with --model)."""
    from ballad_cache.models import list_models

    for name in list_models():
        out.print(name, highlight=False)


@app.command()
@handle_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Demo folder; each step gets a subfolder.")] = Path(
        "ballad-demo"
    ),
    size: Annotated[str, typer.Option(help="full (the README's run) or tiny (a few steps, for CI).")] = "full",
    model: Annotated[
        str,
        typer.Option(
            help="ballad-lite (ImageNet-pretrained EfficientNet-Lite0 + MiniLM, the default) or ballad-tiny "
            "(random-init ViT + MiniLM)."
        ),
    ] = "ballad-lite",
    overwrite: Annotated[bool, typer.Option(help="Redo every step even if its output exists.")] = False,
    device: DeviceOpt = Device.auto,
) -> None:
    """The whole BALLAD pipeline on fmnist-lt with ballad-lite, offline: finetune, extract, fit, sweep, evaluate,
    then export the classifier and predict a few test images with it."""
    from ballad_cache.demo import DEMO_SIZES, run_demo

    if size not in DEMO_SIZES:
        raise typer.BadParameter(f"size must be one of {', '.join(DEMO_SIZES)}", param_hint="--size")
    with RichProgress() as progress:
        summary = run_demo(out_dir, DEMO_SIZES[size], _device(device), progress, overwrite=overwrite, model=model)
    out.print(report_table("fmnist-lt test accuracy (%)", [(r["name"], r) for r in summary["rows"]]))
    out.print(f"report: {out_dir / 'report'}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
