"""Recipes: one paper row each, as a YAML file of `recipes/`, read, checked and planned here (run by `reproduce.py`).

A recipe names the paper and row, the dataset (a spec, the environment its description reads, and the published
split it must match), its stages in order (each a `ballad` command with its options; `{data}` is the dataset root
given to `reproduce`, `{STAGE}` an earlier stage's folder) and the expected numbers with their source and a
tolerance. Every value carries its source in the file's comments or `source:` fields; an expected number that was
not found in a published source is `null` with a note, never a guess.

    name: lift-imagenet-lt
    paper: LIFT (Shi et al., ICML 2024)
    dataset: {spec: imagenet-lt.yaml, env: {IMAGENET_DIR: "{data}"}, published: {classes: 1000, train: 115846}}
    stages:
      finetune: {command: finetune, options: {model: ViT-B-16, pretrained: openai, method: adaptformer}}
      extract: {command: extract-features, options: {model: "local-dir:{finetune}/model-last"}}
      evaluate: {command: evaluate, options: {cache: "{extract}"}}
    expected: {stage: evaluate, head: zero-shot, metrics: {top1: 77.0}, tolerance: 1.0, source: ...}
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BalladError
from ..heads.config import AdapterConfig
from ..heads.metrics import METRICS
from ..inputs.longtail import ShotThresholds, shot_groups
from ..options import OptionError
from ..progress import Report

if TYPE_CHECKING:
    from ..inputs.splits import LTDataset
from .configs import EvalConfig, ExtractConfig, FinetuneConfig

RECIPE_SUFFIX = ".yaml"


def recipe_dir() -> Path:
    """The folder of the shipped recipes: `$BALLAD_RECIPES`, else `recipes/` beside the package."""
    return Path(os.environ.get("BALLAD_RECIPES", Path(__file__).resolve().parents[2] / "recipes"))


@dataclass(frozen=True)
class StageKind:
    """A command a stage may run: its config class (None: export), the inputs it takes besides the config, and
    the option that names the data (filled from the recipe's dataset when the stage leaves it out)."""

    command: str
    config: type | None
    inputs: tuple[str, ...]
    takes_data: bool = False
    grid: bool = False  # options with a list of values are the axes of a grid (sweep)


STAGE_KINDS: dict[str, StageKind] = {
    k.command: k
    for k in (
        StageKind("finetune", FinetuneConfig, ("model", "pretrained"), takes_data=True),
        StageKind("extract-features", ExtractConfig, ("model", "pretrained"), takes_data=True),
        StageKind("fit-adapter", AdapterConfig, ("cache",)),
        StageKind("sweep", AdapterConfig, ("cache", "family", "metric"), grid=True),
        StageKind("evaluate", EvalConfig, ("cache", "adapter")),
        StageKind("export", None, ("model", "pretrained", "adapter", "cache")),
    )
}
RUN_KEYS = ("out", "overwrite", "resume", "device", "workers")  # what reproduce decides, never a recipe


@dataclass
class Stage:
    """One stage: its name (its folder under the run), command, options as written, and where they come from."""

    name: str
    command: str
    options: dict[str, Any]
    source: str = ""

    @property
    def kind(self) -> StageKind:
        """The command's `StageKind`."""
        return STAGE_KINDS[self.command]

    def resolved(self, places: dict[str, str]) -> dict[str, Any]:
        """The options with `{data}` and `{STAGE}` filled in from `places`."""
        return {k: _fill(v, places) for k, v in self.options.items()}

    def config(self, places: dict[str, str] | None = None) -> Any:
        """The stage's library config (a grid's list of configs for sweep; None for export), built and so
        validated; `places` fills `{...}` references (default: left as written).

        Raises:
            BalladError: an option the config refuses, naming the stage and the option.
        """
        kind = self.kind
        if kind.config is None:
            return None
        options = self.resolved(places or {})
        own = {f.name for f in fields(kind.config)}
        values = {k: v for k, v in options.items() if k in own}
        try:
            if kind.grid:
                from .phase_b import expand_grid, family_grid

                axes = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
                family = options.get("family")
                return family_grid(family, axes) if family else expand_grid(AdapterConfig(), **axes)
            return kind.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except OptionError as exc:
            raise BalladError(f"stage '{self.name}': option {exc.field}: {exc.message}") from None
        except (TypeError, ValueError) as exc:
            raise BalladError(f"stage '{self.name}': {exc}") from None


@dataclass
class Expected:
    """The published numbers a recipe is checked against: which stage's result and head, per metric a value (None:
    not published, or not found), their source and the tolerance in points."""

    stage: str
    head: str
    metrics: dict[str, float | None]
    source: str
    tolerance: float
    note: str = ""


@dataclass
class Published:
    """A dataset's published split sizes, checked by `reproduce --dry-run` (None: not checked)."""

    classes: int | None = None
    train: int | None = None
    per_class: tuple[int, int] | None = None
    val: int | None = None
    test: int | None = None
    groups: tuple[int, int, int] | None = None  # many/medium/few classes at BALLAD's thresholds
    source: str = ""


@dataclass
class Recipe:
    """A paper row: everything `ballad reproduce` runs and checks (see the module docstring)."""

    name: str
    path: Path
    paper: str
    row: str
    backbone: str
    data_spec: str
    data_env: dict[str, str]
    needs: str
    published: Published
    stages: list[Stage]
    expected: Expected
    notes: str = ""
    root_optional: bool = False  # the dataset finds its files without --data (the embedded default)
    variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    applied: tuple[str, ...] = ()  # the variants `with_variants` applied: its expected numbers are the recipe's own

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)

    def places(self, data: str | None, out: str | Path) -> dict[str, str]:
        """What `{...}` references stand for in a run into `out` on dataset root `data`."""
        places = {s.name: str(Path(out) / s.name) for s in self.stages}
        if data is not None:
            places["data"] = str(data)
        return places

    def dataset_spec(self, data: str | None) -> str:
        """The dataset spec the stages read: a description file of `data/datasets/` by name, or a spec string."""
        spec = _fill(self.data_spec, {"data": str(data)} if data is not None else {})
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_absolute() and not Path(spec).exists():
            from ..inputs.splits import resource_dir

            return str(resource_dir() / "datasets" / spec)
        return spec

    def env(self, data: str | None) -> dict[str, str]:
        """The environment the dataset reads, filled with `data` (without a root: the entries that need none)."""
        if data is None:
            return {k: v for k, v in self.data_env.items() if "{data}" not in v}
        return {k: str(_fill(v, {"data": str(data)})) for k, v in self.data_env.items()}

    def with_variants(self, names: list[str]) -> Recipe:
        """This recipe with the option overrides of each variant in `names` applied in order (the demo's sizes).

        Raises:
            BalladError: an unknown variant (naming the known ones).
        """
        stages = [Stage(s.name, s.command, dict(s.options), s.source) for s in self.stages]
        for name in names:
            if name not in self.variants:
                known = ", ".join(self.variants) or "none"
                raise BalladError(f"recipe {self.name} has no variant '{name}'; known: {known}")
            for stage in stages:
                stage.options.update(self.variants[name].get(stage.name, {}))
        return replace(self, stages=stages, applied=(*self.applied, *names))


_REFERENCE = re.compile(r"\{([A-Za-z_][\w-]*)\}")


def _fill(value: Any, places: dict[str, str]) -> Any:
    """`value` with each `{name}` that `places` knows replaced (lists element-wise); others are kept."""
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    if not isinstance(value, str):
        return value
    return _REFERENCE.sub(lambda m: places.get(m.group(1), m.group(0)), value)


def list_recipes(folder: Path | None = None) -> list[Path]:
    """The recipe files of `folder` (default: `recipe_dir()`), by name."""
    folder = folder or recipe_dir()
    return sorted(folder.glob(f"*{RECIPE_SUFFIX}")) if folder.is_dir() else []


def find_recipe(name: str) -> Path:
    """A recipe by name (`lift-imagenet-lt`) or by path.

    Raises:
        BalladError: no such recipe (naming the known ones).
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = recipe_dir() / f"{name}{RECIPE_SUFFIX}"
    if candidate.is_file():
        return candidate
    known = ", ".join(p.stem for p in list_recipes())
    raise BalladError(f"unknown recipe '{name}'; known: {known} (or a .yaml file)")


def load_recipe(name: str | Path) -> Recipe:
    """Read and check a recipe: its keys, its stages' commands and options (every stage's config is built), the
    references between stages and the expected numbers.

    Raises:
        BalladError: one line naming the file and what is wrong.
    """
    import yaml

    path = find_recipe(str(name))
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BalladError(f"recipe {path} is not readable YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(body, dict):
        raise BalladError(f"recipe {path}: the top level must be a mapping (name:, paper:, dataset:, stages:, ...)")

    def need(mapping: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
        if key not in mapping or not isinstance(mapping[key], kind):
            raise BalladError(f"recipe {path}: {where} needs '{key}'")
        return mapping[key]

    _known_keys(path, "the top level", body, TOP_KEYS)
    dataset = need(body, "dataset", "the top level", dict)
    _known_keys(path, "dataset", dataset, DATASET_KEYS)
    published = dataset.get("published") or {}
    _known_keys(path, "dataset.published", published, PUBLISHED_KEYS)
    per_class, groups = published.get("per_class"), published.get("groups")
    stages: list[Stage] = []
    for name_, raw in need(body, "stages", "the top level", dict).items():
        if not isinstance(raw, dict) or raw.get("command") not in STAGE_KINDS:
            raise BalladError(f"recipe {path}: stage '{name_}' needs a command, one of {', '.join(STAGE_KINDS)}")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise BalladError(f"recipe {path}: stage '{name_}': options must be a mapping")
        options = {str(k).replace("-", "_"): v for k, v in options.items()}
        stage = Stage(str(name_), raw["command"], options, str(raw.get("source", "")))
        _check_options(path, stage, [s.name for s in stages])
        stages.append(stage)
    exp = need(body, "expected", "the top level", dict)
    _known_keys(path, "expected", exp, EXPECTED_KEYS)
    metrics = need(exp, "metrics", "expected", dict)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise BalladError(f"recipe {path}: expected metric '{unknown[0]}' is none of {', '.join(METRICS)}")
    expected = Expected(
        stage=need(exp, "stage", "expected"),
        head=need(exp, "head", "expected"),
        metrics={k: None if v is None else float(v) for k, v in metrics.items()},
        source=need(exp, "source", "expected"),
        tolerance=float(need(exp, "tolerance", "expected", (int, float))),
        note=str(exp.get("note", "")),
    )
    if expected.stage not in [s.name for s in stages] or STAGE_KINDS[
        next(s.command for s in stages if s.name == expected.stage)
    ].command not in ("evaluate", "sweep", "fit-adapter"):
        raise BalladError(f"recipe {path}: expected.stage '{expected.stage}' is no evaluate, sweep or fit stage")
    evaluated = next(s for s in stages if s.name == expected.stage)
    if evaluated.command == "evaluate" and expected.head not in evaluate_heads(evaluated):
        raise BalladError(
            f"recipe {path}: expected.head '{expected.head}' is none of what stage '{expected.stage}' reports "
            f"({', '.join(evaluate_heads(evaluated))})"
        )
    return Recipe(
        name=need(body, "name", "the top level"),
        path=path,
        paper=need(body, "paper", "the top level"),
        row=need(body, "row", "the top level"),
        backbone=need(body, "backbone", "the top level"),
        data_spec=need(dataset, "spec", "dataset"),
        data_env={str(k): str(v) for k, v in (dataset.get("env") or {}).items()},
        needs=str(dataset.get("needs", "")),
        published=Published(
            classes=published.get("classes"),
            train=published.get("train"),
            per_class=tuple(per_class) if per_class else None,  # type: ignore[arg-type]
            val=published.get("val"),
            test=published.get("test"),
            groups=tuple(groups) if groups else None,  # type: ignore[arg-type]
            source=str(published.get("source", "")),
        ),
        stages=stages,
        expected=expected,
        notes=str(body.get("notes", "")),
        root_optional=bool(dataset.get("root_optional", False)),
        variants=_variants(path, body.get("variants") or {}, stages),
    )


def _variants(path: Path, raw: Any, stages: list[Stage]) -> dict[str, dict[str, dict[str, Any]]]:
    """A recipe's `variants:` (name -> stage -> options), each checked by building its stages' configs.

    Raises:
        BalladError: a variant of an unknown stage or option, or one whose configs do not build.
    """
    if not isinstance(raw, dict):
        raise BalladError(f"recipe {path}: variants must map names to stage options")
    names = [s.name for s in stages]
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for name, overrides in raw.items():
        if not isinstance(overrides, dict) or any(
            k not in names or not isinstance(v, dict) for k, v in overrides.items()
        ):
            raise BalladError(f"recipe {path}: variant '{name}' must map stages ({', '.join(names)}) to options")
        variants[str(name)] = {k: {str(o).replace("-", "_"): x for o, x in v.items()} for k, v in overrides.items()}
        for stage in stages:
            if stage.name in variants[str(name)]:
                changed = Stage(stage.name, stage.command, {**stage.options, **variants[str(name)][stage.name]})
                _check_options(path, changed, names[: names.index(stage.name)])
    return variants


TOP_KEYS = ("name", "paper", "row", "backbone", "dataset", "stages", "expected", "variants", "notes")
DATASET_KEYS = ("spec", "env", "root_optional", "needs", "published")
PUBLISHED_KEYS = ("classes", "train", "per_class", "val", "test", "groups", "source")
STAGE_KEYS = ("command", "source", "options")
EXPECTED_KEYS = ("stage", "head", "metrics", "source", "tolerance", "note")


def _known_keys(path: Path, where: str, mapping: dict[str, Any], known: tuple[str, ...]) -> None:
    """Refuse a key a recipe section does not have (a typo would silently skip a check).

    Raises:
        BalladError: naming the recipe, the section, the key and the known keys.
    """
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise BalladError(f"recipe {path}: {where} has no key '{unknown[0]}'; known: {', '.join(known)}")


def evaluate_heads(stage: Stage) -> list[str]:
    """The heads an evaluate stage reports, by its options (as `evaluate.evaluate_cache` names them)."""
    adapter = "adapter" in stage.options
    heads = ["zero-shot"] + (["adapter"] if adapter else [])
    if stage.options.get("tau") is not None:
        heads.append("adapter+LA" if adapter else "zero-shot+LA")
    if stage.options.get("knn"):
        heads.append(f"knn@{stage.options['knn']}")
    return heads


def _check_options(path: Path, stage: Stage, earlier: list[str]) -> None:
    """A stage's options are its command's (config fields and inputs), its `{...}` references name `data` or an
    earlier stage, and its config builds.

    Raises:
        BalladError: naming the recipe, the stage and the option.
    """
    kind = stage.kind
    known = set(kind.inputs) | ({"data"} if kind.takes_data else set())
    if kind.config is not None:
        known |= {f.name for f in fields(kind.config) if "help" in f.metadata and f.metadata["cli"]}
    for key, value in stage.options.items():
        if key in RUN_KEYS:
            raise BalladError(f"recipe {path}: stage '{stage.name}' sets '{key}', which reproduce decides")
        if key not in known:
            raise BalladError(
                f"recipe {path}: stage '{stage.name}': '{key}' is no option of {stage.command}; known: "
                f"{', '.join(sorted(known))}"
            )
        for ref in _REFERENCE.findall(str(value)):
            if ref != "data" and ref not in earlier:
                raise BalladError(f"recipe {path}: stage '{stage.name}': {{{ref}}} names no earlier stage")
        if isinstance(value, list) and not kind.grid and key not in ("splits",):
            if kind.config is None or not any(f.name == key and "tuple" in str(f.type) for f in fields(kind.config)):
                raise BalladError(f"recipe {path}: stage '{stage.name}': '{key}' takes one value, not a list")
    try:
        stage.config()
    except BalladError as exc:
        raise BalladError(f"recipe {path}: {exc}") from None


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the `with` block (a dataset description reads them), then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_data(recipe: Recipe, data: str | None) -> LTDataset:
    """The dataset a recipe reads under the root `data` (the environment its description reads set meanwhile).

    Raises:
        BalladError: the dataset does not load (missing files, malformed lists).
    """
    from ..inputs.datasets import load_dataset

    with environment(recipe.env(data)):
        return load_dataset(recipe.dataset_spec(data))


def check_data(recipe: Recipe, data: str | None, dataset: LTDataset | None = None) -> list[str]:
    """Compare the dataset at `data` (`dataset` when already loaded) with the recipe's published split; returns
    the lines of what matched.

    Raises:
        BalladError: the first count that differs, naming the split, the number found and the published one.
    """
    spec = recipe.dataset_spec(data)
    dataset = dataset if dataset is not None else load_data(recipe, data)
    pub = recipe.published
    said: list[str] = []

    def check(what: str, found: Any, expected: Any) -> None:
        if expected is None:
            return
        if found != expected:
            raise BalladError(
                f"{recipe.name}: {what} is {found} in {spec}, the published split has {expected} ({pub.source}); "
                "check the list files and the data root"
            )
        said.append(f"{what} {found}: as published")

    said.append(f"read from {dataset.source or spec}")
    check("classes", dataset.num_classes, pub.classes)
    counts = dataset.class_counts("train")
    check("train images", int(counts.sum()), pub.train)
    if pub.per_class is not None:
        check("train images per class (fewest, most)", (int(counts.min()), int(counts.max())), tuple(pub.per_class))
    for split, expected in (("val", pub.val), ("test", pub.test)):
        found = len(dataset.split(split)) if split in dataset.splits else 0
        check(f"{split} images", found, expected)
    if pub.groups is not None:
        groups = shot_groups(counts, ShotThresholds())
        found_groups = tuple(int(n) for n in np.bincount(groups, minlength=3))
        check("many/medium/few classes", found_groups, tuple(pub.groups))
    return said


def recipe_summary(recipe: Recipe) -> dict[str, Any]:
    """`ballad recipes`' line of a recipe: name, paper and row, backbone, expected top-1 and its source."""
    return {
        "name": recipe.name,
        "paper": recipe.paper,
        "row": recipe.row,
        "backbone": recipe.backbone,
        "expected_top1": recipe.expected.metrics.get("top1"),
        "expected_source": recipe.expected.source,
        "needs": recipe.needs,
    }


def model_stages(recipe: Recipe) -> Iterator[tuple[Stage, str, str | None]]:
    """(stage, model, pretrained) of each stage that loads a model by name (not an earlier stage's folder)."""
    for stage in recipe.stages:
        model = stage.options.get("model")
        if isinstance(model, str) and not _REFERENCE.search(model):
            yield stage, model, stage.options.get("pretrained")


def weights_status(model: str, pretrained: str | None) -> str:
    """One line on whether a model's weights resolve here, and from where (`models.clip.weights_source`)."""
    from ..models.clip import weights_source

    try:
        return f"{model} ({pretrained or 'no tag'}): {weights_source(model, pretrained)}"
    except BalladError as exc:
        return f"{model} ({pretrained or 'no tag'}): does not resolve: {exc}"


def recipe_status(recipe: Recipe, data: str | None) -> dict[str, Any]:
    """`ballad recipes`' entry of a recipe: its summary, and whether its data (under `data`, or where the dataset
    looks by itself) and its models' weights are present here."""
    from ..models.clip import weights_source

    entry = recipe_summary(recipe)
    try:
        if data is None and "{data}" in recipe.data_spec:
            raise BalladError("give --data ROOT")
        load_data(recipe, data)
        entry["data"] = "present"
    except BalladError as exc:
        entry["data"] = f"missing ({exc})"
    weights = []
    for _, model, pretrained in model_stages(recipe):
        try:
            where = weights_source(model, pretrained)
            weights.append("download on first use" if "downloaded on first use" in where else "present")
        except BalladError:
            weights.append("missing")
    entry["weights"] = ", ".join(sorted(set(weights))) or "-"
    return entry


def recipes_table(entries: list[dict[str, Any]]) -> Report:
    """`ballad recipes` as a table: one line per paper row."""
    rows = [
        [
            e["name"],
            "-" if e["expected_top1"] is None else f"{e['expected_top1']:.2f}",
            e["data"].split(" (")[0],
            e["weights"],
        ]
        for e in entries
    ]
    lines = [f"{e['name']}: {e['paper']}, {e['row']}; {e['backbone']}; needs {e['needs']}" for e in entries]
    return Report("recipes (ballad reproduce NAME)", ["recipe", "top-1", "data", "weights"], rows, lines)
