"""`ballad`: each command parses its options into a library config (generated from its fields, `generate.py`), calls
one library entry point and prints the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ballad_cache.heads.config import AdapterConfig, SweepConfig
from ballad_cache.options import OVERWRITE_HELP
from ballad_cache.pipelines.configs import DemoConfig, EvalConfig, ExtractConfig, FinetuneConfig, PredictConfig
from ballad_cache.registry import DEVICES

from .generate import build, config_command
from .ui import DEBUG, RichProgress, err, out, print_report, report_table

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
Data = Annotated[
    str, typer.Option("--data", help="Dataset spec: fmnist-lt, cifar100-lt:IF, folder:ROOT, wds:DIR, PATH.yaml.")
]
Model = Annotated[
    str, typer.Option("--model", help="open_clip name (ViT-B-16), a registered one (ballad-lite), or local-dir:PATH.")
]
Pretrained = Annotated[
    str | None, typer.Option("--pretrained", help="open_clip tag (openai, laion2b_...) or a weights file.")
]
Out = Annotated[Path, typer.Option("--out", help="Output folder (created; a finished run is kept unless --overwrite).")]
Cache = Annotated[Path, typer.Option("--cache", help="A feature cache made by extract-features.")]
AdapterDir = Annotated[Path, typer.Option("--adapter", help="Adapter folder (fit-adapter's --out, or sweep's best/).")]
MaybeAdapter = Annotated[
    Path | None, typer.Option("--adapter", help="Adapter folder (fit-adapter's or sweep's best/).")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)]
Device = Annotated[str, typer.Option(help=f"Where to compute: {DEVICES.describe()}.", metavar="|".join(DEVICES))]


@app.callback()
def main_callback(debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False) -> None:
    """Set global flags."""
    DEBUG["on"] = DEBUG["on"] or debug


def _device(name: str) -> Any:
    from ballad_cache.models import resolve_device

    return resolve_device(build(lambda: DEVICES.get(name)))


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
    from ballad_cache.pipelines.finetune import run_finetune

    with RichProgress() as progress:
        r = run_finetune(data, model, pretrained, out_dir, config, _device(device), resume, overwrite, progress)
    if r is not None:
        start = r["start"]["top1"] if r["start"] else float("nan")
        out.print(f"phase A done: val top1 {start:.2f} -> {r['best_val_top1']:.2f} (epoch {r['best_epoch']})")
        random = "; started from random weights (--pretrained none)" if r["random_weights"] else ""
        out.print(f"model: {out_dir / 'model'}; skipped {len(r['skipped'])} unreadable training image(s){random}")


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
    from ballad_cache.pipelines.extract import run_extract

    with RichProgress() as progress:
        m = run_extract(data, model, pretrained, out_dir, config, _device(device), progress)
    if m is not None:
        rows = ", ".join(f"{s} {v['rows']}" for s, v in m["splits"].items())
        skipped = f"; skipped {len(m['skipped'])} bad image(s)" if m["skipped"] else ""
        skipped += "; random weights" if m["model"].get("random_weights") else ""
        out.print(f"cache {out_dir}: {rows} rows, dim {m['embed_dim']}, fingerprint {m['fingerprint']}{skipped}")


@config_command(cache_app, "info")
def cache_info(cache: Cache) -> None:
    """Splits, rows, dims, model, fingerprint and size on disk."""
    from ballad_cache.store.cache import FeatureCache

    print_report(FeatureCache(cache).describe())


@config_command(cache_app, "verify")
def cache_verify(cache: Cache) -> None:
    """Re-hash every shard against the manifest; exit 1 naming the first bad one."""
    from ballad_cache.store.cache import FeatureCache

    checked = FeatureCache(cache).verify()
    out.print(f"ok: {len(checked)} files match the manifest of {cache}")


@config_command(app, "fit-adapter", config=AdapterConfig)
def fit_adapter(
    config: AdapterConfig, cache: Cache, out_dir: Out, overwrite: Overwrite = False, device: Device = "auto"
) -> None:
    """Phase B: train BALLAD's residual linear adapter on cached features (class-balanced by default)."""
    from ballad_cache.pipelines.phase_b import run_fit_adapter

    with RichProgress() as progress:
        meta = run_fit_adapter(cache, out_dir, config, _device(device), overwrite, progress)
    if "val" in meta:
        print_report(report_table(f"adapter {out_dir} on val", [("adapter", meta["val"])]))
    out.print(
        f"adapter written to {out_dir} ({meta['steps']} steps, kept epoch {meta['best_epoch']}, "
        f"{meta['train_seconds']:.1f}s)"
    )


@config_command(app, config=EvalConfig)
def evaluate(
    config: EvalConfig,
    cache: Cache,
    adapter: MaybeAdapter = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write result.json, per_class.csv, plots.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Zero-shot and adapter accuracy on cached features: top-1/5, many/medium/few, per class."""
    from ballad_cache.pipelines.evaluate import run_evaluate, summary_rows

    if config.plot and out_dir is None:
        raise typer.BadParameter("--plot needs --out", param_hint="--plot")
    result = run_evaluate(cache, adapter, config, out_dir, overwrite)
    print_report(report_table(f"{config.split} accuracy (%) on {cache}", summary_rows(result)))
    if "written" in result:
        err.print("wrote " + ", ".join(result["written"]))


@config_command(app, config=SweepConfig, grid_axes=AdapterConfig)
def sweep(
    config: SweepConfig,
    grid_axes: dict[str, list[Any]],
    cache: Cache,
    out_dir: Out,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Train a grid of adapters in one process (shared index streams batched), rank on val, keep the best.

    With no options it fits the one official point. A rerun into the same --out skips finished points; a grid that
    adds points to the folder's grid continues it.
    """
    from ballad_cache.pipelines.phase_b import expand_grid, family_grid, point_name, run_grid

    family = config.family
    configs = build(lambda: family_grid(family, grid_axes) if family else expand_grid(AdapterConfig(), **grid_axes))
    with RichProgress() as progress:
        result = run_grid(cache, out_dir, configs, config.metric, _device(device), overwrite, progress)
    rows = [(point_name(p["config"]), p["val"]) for p in result.points[:10]]
    print_report(report_table(f"sweep on val (top {len(rows)} of {len(result.points)}, by {config.metric})", rows))
    if result.test:
        print_report(report_table("best configuration on test", [("best", result.test)]))
    out.print(f"best adapter: {out_dir / 'best'}; results: {out_dir / 'results.csv'}")


@config_command(app)
def export(
    model: Model,
    adapter: AdapterDir,
    out_dir: Out,
    pretrained: Pretrained = None,
    overwrite: Overwrite = False,
    cache: Annotated[Path | None, typer.Option(help="The adapter's cache, if it moved since the fit.")] = None,
) -> None:
    """Fold the adapter into the model's image tower and write one classifier that plain open_clip loads.

    Load it with `open_clip.create_model_and_transforms("local-dir:OUT")`; the class embeddings and the log prior
    are in OUT/classifier.safetensors, class names, scale and provenance in OUT/classifier.json.
    """
    from ballad_cache.pipelines.export import run_export

    classifier = run_export(model, adapter, out_dir, pretrained, cache, overwrite)
    name = f"local-dir:{out_dir}"
    out.print(f"exported {len(classifier.classnames)} classes to {out_dir}; open_clip loads it as '{name}'")


@config_command(app, config=PredictConfig)
def predict(
    config: PredictConfig,
    model: Model,
    out_file: Annotated[Path, typer.Option("--out", help="Predictions file (CSV or JSON lines).")],
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders (recursive) or .txt path lists.")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="Fold this adapter into --model on the fly.")] = None,
    pretrained: Pretrained = None,
    data: Annotated[str | None, typer.Option("--data", help="Classify a dataset split instead (with labels).")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Classify images with an exported classifier (or a model plus --adapter); with labels, print the accuracy."""
    from ballad_cache.pipelines.predict import run_predict

    if bool(inputs) == bool(data):
        raise typer.BadParameter("give image paths or --data SPEC (one of them)", param_hint="INPUTS / --data")
    with RichProgress() as progress:
        result = run_predict(
            model, out_file, config, inputs, data, adapter, pretrained, _device(device), progress, overwrite
        )
    if result.report:
        print_report(
            report_table(f"{len(result.rows)} images ({data} {config.split})", [("classifier", result.report)])
        )
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable image(s); listed in {out_file}")
    out.print(f"{len(result.rows)} predictions written to {out_file} ({result.images_per_s:.0f} images/s)")


@config_command(data_app, "info")
def data_info(data: Data = "fmnist-lt") -> None:
    """Class counts, imbalance factor and many/medium/few groups of a dataset's train split."""
    from ballad_cache.inputs.datasets import load_dataset

    print_report(load_dataset(data).describe())


@config_command(app)
def models() -> None:
    """List model names: ballad's registered architectures, then open_clip's (use with --model)."""
    from ballad_cache.models import list_models

    for name in list_models():
        out.print(name, highlight=False)


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
    from ballad_cache.pipelines.demo import demo as run_demo

    with RichProgress() as progress:
        summary = run_demo(out_dir, config, _device(device), progress)
    print_report(report_table("fmnist-lt test accuracy (%)", [(r["name"], r) for r in summary["rows"]]))
    out.print(f"report: {out_dir / 'report'}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
