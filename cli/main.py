"""`ballad`: BALLAD long-tailed recognition with CLIP; phase B, evaluation and sweeps run on cached features.

Each command parses its options into the library's config dataclasses (options generated from their fields, see
`generate.py`), opens its run folder through the library, calls one pipeline and prints the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ballad_cache.heads.adapter import AdapterConfig
from ballad_cache.heads.metrics import METRICS
from ballad_cache.pipelines.demo import DemoConfig
from ballad_cache.pipelines.evaluate import EvalConfig
from ballad_cache.pipelines.extract import ExtractConfig
from ballad_cache.pipelines.finetune import FinetuneConfig
from ballad_cache.pipelines.predict import PredictConfig
from ballad_cache.registry import DEVICES

from .generate import build, config_command
from .ui import DEBUG, RichProgress, err, handle_errors, out, print_report, report_table

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

# the options every command spells the same way
Data = Annotated[str, typer.Option("--data", help="Dataset spec: fmnist-lt, cifar100-lt:IF, folder:ROOT, PATH.yaml.")]
Model = Annotated[
    str, typer.Option("--model", help="open_clip name (ViT-B-16), a registered one (ballad-lite), or local-dir:PATH.")
]
Pretrained = Annotated[
    str | None, typer.Option("--pretrained", help="open_clip tag (openai, laion2b_...) or a weights file.")
]
Out = Annotated[Path, typer.Option("--out", help="Output folder (created; a finished run is never overwritten).")]
Cache = Annotated[Path, typer.Option("--cache", help="A feature cache made by extract-features.")]
AdapterDir = Annotated[Path, typer.Option("--adapter", help="Adapter folder (fit-adapter's --out, or sweep's best/).")]
Overwrite = Annotated[bool, typer.Option(help="Redo the work --out already holds instead of refusing (or resuming).")]
Device = Annotated[str, typer.Option(help=f"Where to compute: {DEVICES.describe()}.", metavar="|".join(DEVICES))]


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")] = False,
) -> None:
    """Set global flags."""
    if debug:
        DEBUG["on"] = True


def _device(name: str) -> Any:
    from ballad_cache.models import resolve_device

    build(lambda: DEVICES.get(name))
    return resolve_device(name)


# ---------------------------------------------------------------------------------------------- phase A


@config_command(app, config=FinetuneConfig)
def finetune(
    config: FinetuneConfig,
    out_dir: Out,
    model: Model,
    data: Data = "fmnist-lt",
    pretrained: Pretrained = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Phase A: continue training both CLIP towers on the long-tailed train split (BALLAD's recipe).

    Runs under `torchrun --nproc_per_node=N ballad finetune ...` for DDP (NCCL on GPU, gloo on CPU).
    """
    from ballad_cache.distributed import distributed
    from ballad_cache.inputs.datasets import load_dataset
    from ballad_cache.models import load_model
    from ballad_cache.pipelines.finetune import finetune as run_finetune
    from ballad_cache.pipelines.finetune import run_folder

    with distributed(_device(device)) as (dist, dev):
        folder = run_folder(out_dir, overwrite, resume, main=dist.is_main)
        folder.prepare()
        dist.barrier()
        dataset, loaded = load_dataset(data), load_model(model, pretrained)
        with folder, RichProgress() as progress:
            if not resume:
                folder.write_config(config, data=data, model=model, pretrained=pretrained)
            result = run_finetune(dataset, loaded, out_dir, config, dev, dist, resume=resume, progress=progress)
        if dist.is_main:
            start = result["start"]["top1"] if result["start"] else float("nan")
            out.print(
                f"phase A done: val top1 {start:.2f} -> {result['best_val_top1']:.2f} (epoch {result['best_epoch']}); "
                f"model: {out_dir / 'model'}"
            )
            if result["skipped"]:
                out.print(f"skipped {len(result['skipped'])} unreadable training image(s); listed in summary.json")


# ---------------------------------------------------------------------------------------------- extraction


@config_command(app, "extract-features", config=ExtractConfig)
def extract_features(
    config: ExtractConfig,
    out_dir: Out,
    model: Model,
    data: Data = "fmnist-lt",
    pretrained: Pretrained = None,
    device: Device = "auto",
) -> None:
    """Encode images once with the frozen model into HDF5 shards; reruns skip finished shards.

    Runs under `torchrun --nproc_per_node=N`: each rank writes its own shards, rank 0 the manifest.
    """
    from ballad_cache.distributed import distributed
    from ballad_cache.inputs.datasets import load_dataset
    from ballad_cache.models import load_model
    from ballad_cache.pipelines.extract import cache_folder, resolve_splits
    from ballad_cache.pipelines.extract import extract_features as run_extract

    with distributed(_device(device)) as (dist, dev):
        with cache_folder(out_dir, dist.rank, dist.is_main) as folder, RichProgress() as progress:
            dataset = load_dataset(data)
            config = resolve_splits(config, dataset)
            loaded = load_model(model, pretrained)
            folder.write_config(config, data=data, model=model, pretrained=pretrained)
            manifest = run_extract(dataset, loaded, out_dir, config, dev, dist, progress)
        if manifest is not None:
            rows = ", ".join(f"{s} {v['rows']}" for s, v in manifest["splits"].items())
            skipped = f"; skipped {len(manifest['skipped'])} bad image(s)" if manifest["skipped"] else ""
            fingerprint = manifest["fingerprint"]
            out.print(f"cache {out_dir}: {rows} rows, dim {manifest['embed_dim']}, fingerprint {fingerprint}{skipped}")


@cache_app.command("info")
@handle_errors
def cache_info(cache: Cache) -> None:
    """Splits, rows, dims, model, fingerprint and size on disk."""
    from ballad_cache.store.cache import FeatureCache

    print_report(FeatureCache(cache).describe())


@cache_app.command("verify")
@handle_errors
def cache_verify(cache: Cache) -> None:
    """Re-hash every shard against the manifest; exit 1 naming the first bad one."""
    from ballad_cache.store.cache import FeatureCache

    checked = FeatureCache(cache).verify()
    out.print(f"ok: {len(checked)} files match the manifest of {cache}")


# ---------------------------------------------------------------------------------------------- phase B


@config_command(app, "fit-adapter", config=AdapterConfig)
def fit_adapter(
    config: AdapterConfig, cache: Cache, out_dir: Out, overwrite: Overwrite = False, device: Device = "auto"
) -> None:
    """Phase B: train BALLAD's residual linear adapter on cached features (class-balanced by default)."""
    from ballad_cache.pipelines.phase_b import adapter_folder, fit_on_cache
    from ballad_cache.store.cache import FeatureCache

    c = FeatureCache(cache)
    with adapter_folder(out_dir, overwrite) as folder, RichProgress() as progress:
        folder.write_config(config, cache=str(cache), cache_fingerprint=c.fingerprint)
        meta = fit_on_cache(c, config, out_dir, _device(device), progress)
    if "val" in meta:
        out.print(report_table(f"adapter {out_dir} on val", [("adapter", meta["val"])]))
    out.print(
        f"adapter written to {out_dir} ({meta['steps']} steps, kept epoch {meta['best_epoch']}, "
        f"{meta['train_seconds']:.1f}s)"
    )


@config_command(app, config=EvalConfig)
def evaluate(
    config: EvalConfig,
    cache: Cache,
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter folder (fit-adapter's --out, or sweep's best/).")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write result.json, per_class.csv, plots.")] = None,
    plot: Annotated[bool, typer.Option(help="Per-class accuracy vs training count PNG (needs --out).")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Zero-shot and adapter accuracy on cached features: top-1/5, many/medium/few, per class."""
    from contextlib import nullcontext

    from ballad_cache.heads.adapter import load_adapter
    from ballad_cache.pipelines.evaluate import evaluate_cache, result_folder, summary_rows, write_result
    from ballad_cache.store.cache import FeatureCache

    if plot and out_dir is None:
        raise typer.BadParameter("--plot needs --out", param_hint="--plot")
    folder = result_folder(out_dir, overwrite) if out_dir is not None else None
    with folder or nullcontext():
        c = FeatureCache(cache)
        result = evaluate_cache(c, load_adapter(adapter, c) if adapter else None, config)
        out.print(report_table(f"{config.split} accuracy (%) on {cache}", summary_rows(result)))
        if folder is not None and out_dir is not None:
            folder.write_config(config, cache=str(cache), adapter=str(adapter) if adapter else None)
            err.print("wrote " + ", ".join(str(p) for p in write_result(result, out_dir, plot=plot)))


@config_command(app, grid_axes=AdapterConfig)
def sweep(
    grid_axes: dict[str, list[Any]],
    cache: Cache,
    out_dir: Out,
    metric: Annotated[str, typer.Option(help="Val metric to rank by.", metavar="|".join(METRICS))] = "top1",
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Train a grid of adapters in one process (shared index streams batched), rank on val, keep the best.

    With no options it fits the one official point. A rerun into the same --out skips finished points; a grid that
    adds points to the folder's grid continues it.
    """
    from ballad_cache.pipelines.phase_b import expand_grid, point_name, run_sweep, sweep_config, sweep_folder
    from ballad_cache.store.cache import FeatureCache

    if metric not in METRICS:
        raise typer.BadParameter(f"use one of {', '.join(METRICS)}", param_hint="--metric")
    configs = build(lambda: expand_grid(AdapterConfig(), **grid_axes))
    c = FeatureCache(cache)
    with sweep_folder(out_dir, configs, c, overwrite) as folder, RichProgress() as progress:
        folder.write_config(None, **sweep_config(configs, c, metric))
        result = run_sweep(c, configs, out_dir, metric, _device(device), progress)
    rows = [(point_name(p["config"]), p["val"]) for p in result.points[:10]]
    out.print(report_table(f"sweep on val (top {len(rows)} of {len(result.points)}, ranked by {metric})", rows))
    if result.test:
        out.print(report_table("best configuration on test", [("best", result.test)]))
    out.print(f"best adapter: {out_dir / 'best'}; results: {out_dir / 'results.csv'}")


# ---------------------------------------------------------------------------------------------- the classifier


@app.command()
@handle_errors
def export(
    model: Model,
    adapter: AdapterDir,
    out_dir: Out,
    pretrained: Pretrained = None,
    cache: Annotated[
        Path | None, typer.Option(help="The adapter's cache, if it moved from where adapter.json says it is.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Fold the adapter into the model's image tower and write one classifier that plain open_clip loads.

    Load it with `open_clip.create_model_and_transforms("local-dir:OUT")`; the class embeddings and the log prior
    are in OUT/classifier.safetensors, class names, scale and provenance in OUT/classifier.json.
    """
    from ballad_cache.pipelines.export import build_classifier, export_classifier, export_folder

    with export_folder(out_dir, overwrite) as folder:
        classifier = build_classifier(model, adapter, pretrained, cache)
        folder.write_config(None, model=model, adapter=str(adapter), pretrained=pretrained)
        export_classifier(classifier, out_dir)
    out.print(
        f"exported {len(classifier.classnames)}-class classifier to {out_dir} (adapter ratio "
        f"{classifier.meta['ratio']:g} folded into the image tower); load it with "
        f"open_clip.create_model_and_transforms('local-dir:{out_dir}')"
    )


@config_command(app, config=PredictConfig)
def predict(
    config: PredictConfig,
    model: Model,
    out_file: Annotated[Path, typer.Option("--out", help="Predictions file (CSV or JSON lines).")],
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders (recursive) or .txt lists of paths.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="Fold this adapter in on the fly (--model is then the phase-A model).")
    ] = None,
    pretrained: Pretrained = None,
    data: Annotated[str | None, typer.Option("--data", help="Classify a dataset split instead (with labels).")] = None,
    split: Annotated[str, typer.Option(help="Split of --data.")] = "test",
    device: Device = "auto",
) -> None:
    """Classify images with an exported classifier (or a model plus --adapter); with labels, print the accuracy."""
    from ballad_cache.inputs.datasets import load_dataset
    from ballad_cache.pipelines.export import load_classifier
    from ballad_cache.pipelines.predict import collect_images, predict_split, write_predictions
    from ballad_cache.store.runs import check_writable

    if bool(inputs) == bool(data):
        raise typer.BadParameter("give image paths or --data SPEC (one of them)", param_hint="INPUTS / --data")
    check_writable(out_file)
    images = load_dataset(data).split(split) if data else collect_images(list(inputs or []))
    classifier = load_classifier(model, adapter, pretrained)
    with RichProgress() as progress:
        result = predict_split(classifier, images, config, _device(device), progress)
    write_predictions(result, out_file, config.format, config.top_k)
    if result.report:
        out.print(report_table(f"{len(result.rows)} images ({data} {split})", [("classifier", result.report)]))
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable image(s); listed in {out_file}")
    out.print(f"{len(result.rows)} predictions written to {out_file} ({result.images_per_s:.0f} images/s)")


# ---------------------------------------------------------------------------------------------- the rest


@data_app.command("info")
@handle_errors
def data_info(data: Data = "fmnist-lt") -> None:
    """Class counts, imbalance factor and many/medium/few groups of a dataset's train split."""
    from ballad_cache.inputs.datasets import load_dataset

    print_report(load_dataset(data).describe())


@app.command()
@handle_errors
def models() -> None:
    """List model names: ballad's registered architectures, then open_clip's (use with --model)."""
    from ballad_cache.models import list_models

    for name in list_models():
        out.print(name, highlight=False, markup=False)


@config_command(app, config=DemoConfig)
def demo(
    config: DemoConfig,
    out_dir: Annotated[Path, typer.Option("--out", help="Demo folder; each step gets a subfolder.")] = Path(
        "ballad-demo"
    ),
    device: Device = "auto",
) -> None:
    """The whole BALLAD pipeline on fmnist-lt with ballad-lite, offline: finetune, extract, fit, sweep, evaluate,
    then export the classifier and predict a few test images with it."""
    from ballad_cache.pipelines.demo import DEMO_SIZES, demo_folder, run_demo

    with demo_folder(out_dir), RichProgress() as progress:
        summary = run_demo(out_dir, DEMO_SIZES[config.size], _device(device), progress, config.overwrite, config.model)
    out.print(report_table("fmnist-lt test accuracy (%)", [(r["name"], r) for r in summary["rows"]]))
    out.print(f"report: {out_dir / 'report'}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
