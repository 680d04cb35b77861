"""`ballad`: each command parses its options into a library config (generated from its fields, `generate.py`), calls
one library entry point and prints the result."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from ballad_cache.errors import BalladError
from ballad_cache.heads.config import AdapterConfig, SweepConfig
from ballad_cache.pipelines.configs import (
    CacheSource,
    DatasetSource,
    DemoConfig,
    DemoFolder,
    EvalConfig,
    EvalFiles,
    ExportSource,
    ExtractConfig,
    FinetuneConfig,
    InfoFormat,
    ModelSource,
    Placement,
    PredictConfig,
    PredictFiles,
    RecipeData,
    Reporting,
    ReproduceConfig,
    ResumableOutput,
    RunOutput,
)

from .flags import flag
from .generate import build, config_command
from .ui import DEBUG, RichProgress, err, out, print_report, report_table

app = typer.Typer(
    help="BALLAD long-tailed recognition with CLIP: finetune once, cache features, fit adapters in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(help="Inspect and check feature caches.", no_args_is_help=True, rich_markup_mode=None)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")


@app.callback()
def main_callback(debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False) -> None:
    """Set global flags."""
    DEBUG["on"] = DEBUG["on"] or debug


def _device(placement: Placement) -> Any:
    from ballad_cache.models import resolve_device

    return resolve_device(placement.device)


def _announce(line: str) -> None:
    """A command's first line: what it runs on, on standard error, never wrapped (one line for grep and tests);
    under torchrun, rank 0's alone."""
    if os.environ.get("RANK", "0") == "0":
        err.print(line, soft_wrap=True, highlight=False)


def _model_words(source: ModelSource) -> str:
    """`--model` and `--pretrained` as a run's first line names them."""
    return f"{source.model} ({source.pretrained})" if source.pretrained else source.model


@config_command(
    app, config=FinetuneConfig, source=ModelSource, dataset=DatasetSource, run=ResumableOutput, placement=Placement,
    report=Reporting,
)  # fmt: skip
def finetune(
    config: FinetuneConfig,
    source: ModelSource,
    dataset: DatasetSource,
    run: ResumableOutput,
    placement: Placement,
    report: Reporting,
) -> None:
    """Phase A: tune CLIP on the long-tailed train split: both towers whole (BALLAD, the default) or a few
    parameters of the image tower (--method bitfit|ssf|lora|adaptformer|vpt, LIFT's placement).

    Runs under `torchrun --nproc_per_node=N ballad finetune ...` for DDP (NCCL on GPU, gloo on CPU).
    """
    from ballad_cache.pipelines.finetune import run_finetune

    device = _device(placement)
    _announce(f"finetune: {dataset.data} with {_model_words(source)}, --method {config.method} -> {run.out}")
    with RichProgress() as progress:
        r = run_finetune(
            dataset.data, source.model, source.pretrained, run.out, config, device, run.resume, run.overwrite, progress,
            report,
        )  # fmt: skip
    if r is not None:
        if not r.get("has_val", True):  # nothing ranked the epochs
            out.print(f"phase A done: {r['steps']} steps; no val split, so the last epoch's model is kept")
        elif r["best_epoch"] < 0:
            out.print(f"phase A stopped after {r['steps']} steps, before an epoch finished; model/ holds those weights")
        else:
            start = f"{r['start']['top1']:.2f} -> " if r["start"] else ""
            out.print(f"phase A done: val top1 {start}{r['best_val_top1']:.2f} (epoch {r['best_epoch']} kept)")
        random = f"; started from random weights ({flag('pretrained')} none)" if r["random_weights"] else ""
        out.print(f"model: {run.out / 'model'}; skipped {len(r['skipped'])} unreadable training image(s){random}")


@config_command(
    app, "extract-features", config=ExtractConfig, source=ModelSource, dataset=DatasetSource, run=RunOutput,
    placement=Placement,
)  # fmt: skip
def extract_features(
    config: ExtractConfig, source: ModelSource, dataset: DatasetSource, run: RunOutput, placement: Placement
) -> None:
    """Encode images once with the frozen model into HDF5 shards; reruns skip finished shards.

    Runs under `torchrun --nproc_per_node=N`: each rank writes its own shards, rank 0 the manifest.
    """
    from ballad_cache.pipelines.extract import run_extract

    device = _device(placement)  # `--overwrite` is the config's own (`ExtractConfig.overwrite`): the same option
    _announce(f"extract-features: {dataset.data} with {_model_words(source)} -> {run.out}")
    with RichProgress() as progress:
        m = run_extract(dataset.data, source.model, source.pretrained, run.out, config, device, progress)
    if m is not None:
        rows = ", ".join(f"{s} {v['rows']}" for s, v in m["splits"].items())
        skipped = f"; skipped {len(m['skipped'])} bad image(s)" if m["skipped"] else ""
        skipped += "; random weights" if m["model"].get("random_weights") else ""
        out.print(f"cache {run.out}: {rows} rows, dim {m['embed_dim']}, fingerprint {m['fingerprint']}{skipped}")


@config_command(cache_app, "info", source=CacheSource, fmt=InfoFormat)
def cache_info(source: CacheSource, fmt: InfoFormat) -> None:
    """Splits, rows, dims, model, fingerprint and size on disk."""
    from ballad_cache.store.cache import FeatureCache

    _show(FeatureCache(source.cache), fmt)


def _show(subject: Any, fmt: InfoFormat) -> None:
    """An info command's subject (a cache, a dataset): its `facts()` as JSON, alone on standard output, with
    `--json`; else its `describe()` report as a table."""
    import json

    if fmt.json:
        sys.stdout.write(json.dumps(subject.facts(), indent=2) + "\n")
    else:
        print_report(subject.describe())


@config_command(cache_app, "verify", source=CacheSource)
def cache_verify(source: CacheSource) -> None:
    """Re-hash every shard against the manifest; exit 1 naming the first bad one."""
    from ballad_cache.store.cache import FeatureCache

    checked = FeatureCache(source.cache).verify()
    out.print(f"ok: {len(checked)} files match the manifest of {source.cache}")


@config_command(
    app, "fit-adapter", config=AdapterConfig, source=CacheSource, run=RunOutput, placement=Placement, report=Reporting
)
def fit_adapter(
    config: AdapterConfig, source: CacheSource, run: RunOutput, placement: Placement, report: Reporting
) -> None:
    """Phase B: fit a classifier head on cached features: BALLAD's residual adapter by default (class-balanced), or
    any head family --head names (a cosine head, a cache of training features, closed-form ones)."""
    from ballad_cache.pipelines.phase_b import run_fit_adapter

    device = _device(placement)
    _announce(f"fit-adapter: {source.cache}, head {config.head} -> {run.out}")
    with RichProgress() as progress:
        meta = run_fit_adapter(source.cache, run.out, config, device, run.overwrite, progress, report)
    if "val" in meta:
        print_report(report_table(f"adapter {run.out} on val", [("adapter", meta["val"])]))
    how = (
        f"{meta['steps']} steps, kept epoch {meta['best_epoch']}"
        if meta["steps"]
        else f"{meta['config']['head']} built in one pass"
    )
    out.print(f"adapter written to {run.out} ({how}, {meta['train_seconds']:.1f}s)")


@config_command(app, config=EvalConfig, source=CacheSource, files=EvalFiles)
def evaluate(config: EvalConfig, source: CacheSource, files: EvalFiles) -> None:
    """Zero-shot and adapter accuracy on cached features: top-1/5, many/medium/few, per class."""
    from ballad_cache.pipelines.evaluate import run_evaluate, summary_rows

    if config.plot and files.out is None:
        raise typer.BadParameter(f"{flag('plot')} needs {flag('out')}", param_hint=flag("plot"))
    _announce(f"evaluate: {source.cache}" + (f" with {files.adapter}" if files.adapter else "") + f", {config.split}")
    result = run_evaluate(source.cache, files.adapter, config, files.out, files.overwrite)
    views = f", {result['views']} views" if result.get("views", "center") != "center" else ""
    print_report(report_table(f"{config.split} accuracy (%) on {source.cache}{views}", summary_rows(result)))
    if "written" in result:
        err.print("wrote " + ", ".join(result["written"]))


@config_command(
    app, config=SweepConfig, grid_axes=AdapterConfig, source=CacheSource, run=RunOutput, placement=Placement,
    report=Reporting,
)  # fmt: skip
def sweep(
    config: SweepConfig,
    grid_axes: dict[str, list[Any]],
    source: CacheSource,
    run: RunOutput,
    placement: Placement,
    report: Reporting,
) -> None:
    """Train a grid of adapters in one process (shared index streams batched), rank on val, keep the best.

    With no options it fits the one official point. A rerun into the same --out skips finished points; a grid that
    adds points to the folder's grid continues it.
    """
    from ballad_cache.pipelines.phase_b import expand_grid, family_grid, point_name, run_grid

    family = config.family
    configs = build(lambda: family_grid(family, grid_axes) if family else expand_grid(AdapterConfig(), **grid_axes))
    device = _device(placement)
    _announce(f"sweep: {source.cache} -> {run.out}")
    with RichProgress() as progress:
        result = run_grid(source.cache, run.out, configs, config.metric, device, run.overwrite, progress, report)
    rows = [(point_name(p["config"]), p["val"]) for p in result.points[:10]]
    print_report(report_table(f"sweep on val (top {len(rows)} of {len(result.points)}, by {config.metric})", rows))
    if result.test:
        print_report(report_table("best configuration on test", [("best", result.test)]))
    out.print(f"best adapter: {run.out / 'best'}; results: {run.out / 'results.csv'}")


@config_command(app, source=ModelSource, head=ExportSource, run=RunOutput)
def export(source: ModelSource, head: ExportSource, run: RunOutput) -> None:
    """Fold the adapter into the model's image tower and write one classifier that plain open_clip loads.

    Load it with `open_clip.create_model_and_transforms("local-dir:OUT")`; the class embeddings and the log prior
    are in OUT/classifier.safetensors, class names, scale and provenance in OUT/classifier.json.
    """
    from ballad_cache.models import local_dir_name
    from ballad_cache.pipelines.export import run_export

    _announce(f"export: {_model_words(source)} with {head.adapter} -> {run.out}")
    classifier = run_export(source.model, head.adapter, run.out, source.pretrained, head.cache, run.overwrite)
    name = local_dir_name(run.out)
    who = "ballad (a tuned-model folder: base weights + tuner)" if "tuned_source" in classifier.meta else "open_clip"
    out.print(f"exported {len(classifier.classnames)} classes to {run.out}; {who} loads it as '{name}'")


@config_command(app, config=PredictConfig, source=ModelSource, files=PredictFiles, placement=Placement)
def predict(
    config: PredictConfig,
    source: ModelSource,
    files: PredictFiles,
    placement: Placement,
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders (recursive) or .txt path lists.")
    ] = None,
) -> None:
    """Classify images with an exported classifier (or a model plus --adapter); with labels, print the accuracy."""
    from ballad_cache.pipelines.configs import PLOTTED_PREDICTIONS
    from ballad_cache.pipelines.predict import run_predict, to_stdout

    if bool(inputs) == bool(files.data):
        raise typer.BadParameter(
            f"give image paths or {flag('data')} SPEC (one of them)", param_hint=f"INPUTS / {flag('data')}"
        )
    device = _device(placement)
    what = files.data or f"{len(inputs or [])} input(s)"
    _announce(f"predict: {what} with {_model_words(source)} -> {files.out}")
    with RichProgress() as progress:
        result = run_predict(
            source.model,
            files.out,
            config,
            inputs,
            files.data,
            files.adapter,
            source.pretrained,
            device,
            progress,
            files.overwrite,
            files.plot,
        )
    stream = to_stdout(files.out)  # the predictions are standard output: everything else goes to stderr
    said = err if stream else out
    where = "standard output" if stream else str(files.out)
    if result.report:
        title = f"{len(result.rows)} images ({files.data} {config.split})"
        print_report(report_table(title, [("classifier", result.report)]), said)
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable image(s); listed in {where}")
    said.print(f"{len(result.rows)} predictions written to {where} ({result.images_per_s:.0f} images/s)")
    if files.plot is not None:
        said.print(f"the first {min(len(result.rows), PLOTTED_PREDICTIONS)} drawn in {files.plot}")


@config_command(data_app, "info", dataset=DatasetSource, fmt=InfoFormat)
def data_info(dataset: DatasetSource, fmt: InfoFormat) -> None:
    """Class counts, imbalance factor and many/medium/few groups of a dataset's train split."""
    from ballad_cache.inputs.datasets import load_dataset

    _show(load_dataset(dataset.data), fmt)


@config_command(app, fmt=InfoFormat)
def models(fmt: InfoFormat) -> None:
    """List model names with their pretrained tags: ballad's registered architectures, then open_clip's (use with
    --model and --pretrained)."""
    import json

    from ballad_cache.models.clip import model_tags

    entries = model_tags()
    if fmt.json:
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
        return
    for e in entries:
        tags = ", ".join(e["pretrained"]) or "-"
        out.print(f"{e['name']}  ({e['help']})" if e["source"] == "ballad" else f"{e['name']}  {tags}", highlight=False)


@config_command(app, config=DemoConfig, folder=DemoFolder, placement=Placement)
def demo(config: DemoConfig, folder: DemoFolder, placement: Placement) -> None:
    """The whole BALLAD pipeline on fmnist-lt with ballad-lite, offline: finetune, extract, fit, sweep, evaluate,
    then export the classifier and predict a few test images with it."""
    from ballad_cache.pipelines.demo import demo as run_demo

    device = _device(placement)
    _announce(f"demo: fmnist-lt with {config.model} -> {folder.out}")
    with RichProgress() as progress:
        summary = run_demo(folder.out, config, device, progress)
    print_report(report_table("fmnist-lt test accuracy (%)", [(r["name"], r) for r in summary["rows"]]))
    out.print(f"report: {folder.out / 'report'}")


@config_command(app, source=RecipeData, fmt=InfoFormat)
def recipes(source: RecipeData, fmt: InfoFormat) -> None:
    """List the paper rows `ballad reproduce` runs: paper, backbone, expected top-1, and whether the data and the
    weights are here."""
    import json

    from ballad_cache.pipelines.recipes import list_recipes, load_recipe, recipe_status, recipes_table

    entries = [recipe_status(load_recipe(path), source.data) for path in list_recipes()]
    if fmt.json:
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
    else:
        print_report(recipes_table(entries))


@config_command(app, config=ReproduceConfig, run=RunOutput, placement=Placement, report=Reporting)
def reproduce(
    config: ReproduceConfig,
    run: RunOutput,
    placement: Placement,
    report: Reporting,
    recipe: Annotated[str, typer.Argument(help="A recipe name (`ballad recipes` lists them) or a recipe .yaml file.")],
) -> None:
    """Run a paper row end to end: every stage of the recipe into its own folder under --out, then achieved
    against expected per metric, the time of each stage and the commands it ran.

    A rerun resumes and reuses finished stages whose config equals the recipe's; --dry-run checks the data and
    weights and estimates each stage's cost without running anything.
    """
    from ballad_cache.pipelines.recipes import load_recipe
    from ballad_cache.pipelines.reproduce import dry_run, plan_tables, report_tables
    from ballad_cache.pipelines.reproduce import reproduce as run_reproduce

    device = _device(placement)
    chosen = load_recipe(recipe).with_variants(list(config.variant))
    where = f" on {config.data}" if config.data else ""
    _announce(f"reproduce{' --dry-run' if config.dry_run else ''}: {recipe}{where} -> {run.out}")
    if config.dry_run:
        plan = dry_run(chosen, config.data, run.out, device)
        for table in plan_tables(plan):
            print_report(table)
        if plan["data_error"]:  # the plan is printed; the exit status says the data is not the published split
            raise BalladError(plan["data_error"])
        return
    with RichProgress() as progress:
        result = run_reproduce(chosen, config.data, run.out, device, run.overwrite, progress, report)
    for table in report_tables(result):
        print_report(table)
    out.print(f"report: {run.out / 'report.json'}; commands: {run.out / 'commands.sh'}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
