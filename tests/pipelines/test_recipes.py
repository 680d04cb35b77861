"""Recipes: every one parses and builds its stages; the data check against the published split; dry runs; the
demo recipe end to end; a changed recipe refused on reuse."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.inputs.longtail import ShotThresholds
from ballad_cache.pipelines.recipes import (
    STAGE_KINDS,
    Published,
    check_data,
    list_recipes,
    load_recipe,
)
from ballad_cache.pipelines.reproduce import dry_run, stage_command
from cli.main import app

runner = CliRunner()
RECIPES = [p.stem for p in list_recipes()]
LISTED = ("lift-imagenet-lt", "lift-places-lt", "lift-inat2018", "ballad-imagenet-lt-rn50")


def test_the_shipped_recipes_are_there_and_every_stage_builds():
    assert {"demo", "ballad-imagenet-lt-rn50", "lift-imagenet-lt", "lift-places-lt", "lift-inat2018"} <= set(RECIPES)
    assert {"lift-cifar100-lt-if100", "lift-cifar100-lt-if50", "lift-cifar100-lt-if10"} <= set(RECIPES)
    for name in RECIPES:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.expected.source and recipe.published.source
        for stage in recipe.stages:
            config = stage.config()
            assert (config is None) == (STAGE_KINDS[stage.command].config is None), (name, stage.name)
        for metric, value in recipe.expected.metrics.items():  # a number, or None with a note saying why
            assert value is not None or recipe.expected.note, (name, metric)


def _counts(num: int, total: int, lo: int, hi: int, groups: tuple[int, int, int] | None) -> np.ndarray:
    """Per-class train counts with the given sum, fewest and most (and many/medium/few class numbers)."""
    t = ShotThresholds()
    if groups is None:
        floors, caps = np.full(num, lo), np.full(num, hi)
    else:
        many, medium, few = groups
        floors = np.array([t.many + 1] * many + [t.few] * medium + [lo] * few)
        caps = np.array([hi] * many + [t.many] * medium + [t.few - 1] * few)
    counts = floors.copy()
    counts[0], counts[-1] = hi, lo
    left = total - counts.sum()
    for c in range(1, num - 1):
        add = int(min(left, caps[c] - counts[c]))
        counts[c] += add
        left -= add
    assert left == 0 and counts.min() == lo and counts.max() == hi
    return counts


def write_published_lists(root: Path, recipe_name: str, train_delta: int = 0) -> Path:
    """List files (no images) of a recipe's published split sizes under `root`, named as its description reads
    them; `train_delta` images more in train (a wrong count)."""
    recipe = load_recipe(recipe_name)
    pub = recipe.published
    assert pub.classes and pub.train
    lo, hi = pub.per_class or (2, 1000)
    counts = _counts(pub.classes, pub.train, lo, hi, pub.groups)
    counts[1] += train_delta
    desc = yaml.safe_load(Path(recipe.dataset_spec(str(root))).read_text())
    root.mkdir(parents=True, exist_ok=True)
    names = {split: Path(path).name for split, path in desc["splits"].items()}
    rows = {"train": np.repeat(np.arange(pub.classes), counts)}
    for split, size in (("val", pub.val), ("test", pub.test)):
        if size:
            rows[split] = np.arange(size) % pub.classes
    for split, labels in rows.items():
        lines = [f"{split}/{c}/{i}.jpg {c}" for i, c in enumerate(labels)]
        (root / names[split]).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("name", LISTED)
def test_the_data_check_passes_on_lists_of_the_published_sizes(name, tmp_path):
    root = write_published_lists(tmp_path / name, name)
    said = check_data(load_recipe(name), str(root))
    pub = load_recipe(name).published
    assert f"train images {pub.train}: as published" in said and f"classes {pub.classes}: as published" in said


def test_a_wrong_count_fails_naming_the_split_and_the_numbers(tmp_path):
    root = write_published_lists(tmp_path / "places", "lift-places-lt", train_delta=-1)
    wrong = r"train images is 62499 in \S*places-lt.yaml, the published split has 62500"
    with pytest.raises(BalladError, match=wrong) as exc:
        check_data(load_recipe("lift-places-lt"), str(root))
    assert "\n" not in str(exc.value)
    root = write_published_lists(tmp_path / "inet", "lift-imagenet-lt")
    (root / "ImageNet_LT_test.txt").write_text("test/0/0.jpg 0\n")
    with pytest.raises(BalladError, match=r"test images is 1 in \S*imagenet-lt.yaml, the published split has 50000"):
        check_data(load_recipe("lift-imagenet-lt"), str(root))
    recipe = load_recipe("lift-places-lt")
    recipe.published = Published(classes=365, groups=(130, 164, 71), source="a test")
    with pytest.raises(BalladError, match=r"many/medium/few classes is \(131, 163, 71\)"):
        check_data(recipe, str(write_published_lists(tmp_path / "p2", "lift-places-lt")))


def test_a_dry_run_prints_every_stage_and_estimates_from_measured_costs(tmp_path):
    root = write_published_lists(tmp_path / "inet", "lift-imagenet-lt")
    plan = dry_run("lift-imagenet-lt", str(root), tmp_path / "out", "cuda")
    assert [s["name"] for s in plan["stages"]] == ["finetune", "extract", "evaluate"]
    finetune, extract, evaluate = plan["stages"]
    # ViT-B-16 bf16 on a GPU: 1341.8 training images/s measured, 10 epochs of 115,846 images
    assert finetune["seconds"] == pytest.approx(115846 * 10 / 1341.8)
    # the five crops and the center view of 50,000 test images, 512 float16 values each; fp32 extraction at 874/s
    assert extract["disk_bytes"] == 50000 * 6 * 512 * 2
    assert extract["seconds"] == pytest.approx(50000 * 6 / 874.0)
    assert "--eval-views five-crop" in extract["command"] and "model-last" in extract["command"]
    assert evaluate["memory_bytes"] == 50000 * 6 * 512 * 4  # the scored split, every crop, in float32
    assert plan["weights"] == ["ViT-B-16 (openai): " + plan["weights"][0].split(": ", 1)[1]]
    assert "open_clip tag" in plan["weights"][0]
    r = runner.invoke(app, ["reproduce", "lift-imagenet-lt", "--data", str(root), "--out", str(tmp_path / "o")] + [
        "--dry-run", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for stage, command in (("finetune", "finetune"), ("extract", "extract-features"), ("evaluate", "evaluate")):
        line = next(line for line in lines if line.startswith(f"{stage}: "))  # one line each, unwrapped
        assert f"ballad {command} " in line and f"--out {tmp_path / 'o' / stage}" in line
    assert "not measured" in r.output  # ViT-B-16 on a CPU: no measured rate, no made-up estimate
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_every_recipe_command_parses_as_the_cli_would(tmp_path):
    """The commands a report prints run by hand: each parses against its command's options."""
    import click

    group = typer.main.get_command(app)
    for name in RECIPES:
        recipe = load_recipe(name)
        for stage in recipe.stages:
            words = shlex.split(stage_command(recipe, stage, str(tmp_path), tmp_path / "out", "cpu"))
            words = [w for w in words if "=" not in w or w.startswith("-")]  # the environment prefix
            assert words[:2] == ["ballad", stage.command]
            command = group.commands[stage.command]  # type: ignore[attr-defined]
            try:
                command.make_context(stage.command, words[2:], resilient_parsing=False)
            except click.exceptions.Exit:
                pass


def test_a_recipe_with_an_unknown_option_or_reference_is_refused(tmp_path):
    body = yaml.safe_load(Path(list_recipes()[0].parent / "demo.yaml").read_text())
    body["stages"]["adapter"]["options"]["ratoi"] = 0.3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(BalladError, match=r"stage 'adapter': 'ratoi' is no option of fit-adapter; known: "):
        load_recipe(str(path))
    del body["stages"]["adapter"]["options"]["ratoi"]
    body["stages"]["adapter"]["options"]["cache"] = "{sweep}"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(BalladError, match=r"\{sweep\} names no earlier stage"):
        load_recipe(str(path))
    body["stages"]["adapter"]["options"].update(cache="{cache}", lr=-1)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(BalladError, match=r"stage 'adapter': option lr"):
        load_recipe(str(path))
    body["stages"]["adapter"]["options"]["lr"] = 0.2
    body["dataset"]["published"]["per_clas"] = [5, 500]  # a typo would silently skip a check
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(BalladError, match=r"dataset.published has no key 'per_clas'; known: classes, train"):
        load_recipe(str(path))
    del body["dataset"]["published"]["per_clas"]
    body["expected"]["head"] = "adaptor"  # found before any stage runs, not after hours of training
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(BalladError, match=r"expected.head 'adaptor' is none of .*zero-shot, adapter, adapter\+LA"):
        load_recipe(str(path))


def test_recipes_lists_each_row(tmp_path):
    r = runner.invoke(app, ["recipes", "--json"])
    assert r.exit_code == 0, r.output
    entries = {e["name"]: e for e in json.loads(r.output)}
    assert set(entries) == set(RECIPES)
    assert entries["lift-imagenet-lt"]["expected_top1"] == 77.0 and entries["lift-imagenet-lt"]["data"].startswith(
        "missing"
    )
    assert entries["ballad-imagenet-lt-rn50"]["expected_top1"] is None
    root = write_published_lists(tmp_path / "inet", "lift-imagenet-lt")
    r = runner.invoke(app, ["recipes", "--json", "--data", str(root)])
    assert json.loads(r.output)[[e["name"] for e in json.loads(r.output)].index("lift-imagenet-lt")]["data"] == (
        "present"
    )


@pytest.mark.slow
def test_reproduce_runs_the_demo_recipe_resumes_and_refuses_a_changed_one(ballad_data, tmp_path):
    """`reproduce demo` runs the demo's stages (as `ballad demo` does: the same numbers), reports achieved against
    expected with each stage's time and the commands, reuses every stage on a rerun, and refuses a recipe whose
    stage config changed, naming the field, until --overwrite."""
    out = tmp_path / "r"
    args = ["reproduce", "demo", "--variant", "tiny", "--out", str(out), "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["finetune", "cache", "adapter", "sweep", "evaluate", "export"]
    assert not any(s["reused"] for s in report["stages"]) and all(s["seconds"] >= 0 for s in report["stages"])
    for stage in report["stages"]:
        assert json.loads((out / stage["name"] / "config.json").read_text())["command"] == stage["command"].split()[1]
    adapter = json.loads((out / "evaluate" / "result.json").read_text())["heads"]["adapter"]
    by_metric = {m["metric"]: m for m in report["metrics"]}
    assert by_metric["top1"]["achieved"] == pytest.approx(adapter["top1"])
    assert by_metric["top1"]["expected"] == 78.97
    # a variant's run is not the row: the report says so rather than judging it against the full demo's numbers
    assert report["variants"] == ["tiny"] and by_metric["top1"]["within_tolerance"] is None
    assert by_metric["top1"]["difference"] == pytest.approx(round(adapter["top1"] - 78.97, 2))
    assert "variants tiny applied" in report["note"]
    assert (out / "commands.sh").read_text().count("\nballad ") == 6
    # the same stages as `ballad demo`: the same numbers
    d = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(tmp_path / "d"), "--device", "cpu"])
    assert d.exit_code == 0, d.output
    demo_rows = json.loads((tmp_path / "d" / "report" / "summary.json").read_text())["rows"]
    assert demo_rows[1]["top1"] == adapter["top1"] and demo_rows[1]["few"] == adapter["few"]

    first = {st["name"]: st["seconds"] for st in report["stages"]}

    # a rerun reuses every stage and rewrites nothing
    def stamps() -> dict[Path, tuple[bytes, int | None]]:
        # a finished sweep re-ranks its kept points and writes its tables and best/ again, the same bytes
        return {p: (p.read_bytes(), None if "sweep" in p.parts else p.stat().st_mtime_ns) for p in weights}

    weights = sorted(out.rglob("*.safetensors"))
    before = stamps()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    again = json.loads((out / "report.json").read_text())["stages"]
    assert all(s["reused"] for s in again)
    assert {st["name"]: st["seconds"] for st in again} == first  # the time each stage took when it ran
    assert stamps() == before
    # another row into the same folder: refused naming what differs, and nothing rewritten (commands.sh included)
    commands = (out / "commands.sh").read_bytes()
    r = runner.invoke(app, ["reproduce", "lift-places-lt", *args[4:], "--data", str(tmp_path)])
    assert r.exit_code == 1 and "recipe 'demo' -> 'lift-places-lt'" in " ".join(r.output.split())
    r = runner.invoke(app, ["reproduce", "demo", *args[4:]])  # the full demo: phase A's config differs
    assert r.exit_code == 1 and "config.epochs 1 -> 4" in " ".join(r.output.split())
    assert (out / "commands.sh").read_bytes() == commands
    # the recipe changed (phase B's learning rate): refused naming the field, then redone with --overwrite
    body = yaml.safe_load((list_recipes()[0].parent / "demo.yaml").read_text())
    body["stages"]["adapter"]["options"]["lr"] = 0.1
    changed = tmp_path / "demo.yaml"
    changed.write_text(yaml.safe_dump(body, sort_keys=False))
    r = runner.invoke(app, ["reproduce", str(changed), *args[2:]])
    assert r.exit_code == 1
    message = " ".join(r.output.split())
    assert "adapter" in message and "lr 0.2 -> 0.1" in message and "--overwrite" in message
    r = runner.invoke(app, ["reproduce", str(changed), *args[2:], "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "adapter" / "adapter.json").read_text())["config"]["lr"] == 0.1


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-100 binary archive of the real sizes (500 train and 100 test images per class), blank pixels."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-binary"
    folder.mkdir()
    for name, per_class in (("train.bin", 500), ("test.bin", 100)):
        rows = np.zeros((100 * per_class, 3074), dtype=np.uint8)
        rows[:, 1] = np.arange(100 * per_class) % 100  # the fine label
        rows.tofile(folder / name)
    return root


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_dry_runs(name, tmp_path, cifar_root, ballad_data):
    """Each shipped recipe dry-runs on data of its published sizes: the data matches, its models' weights
    resolve (or say where they will come from), and every stage is planned."""
    recipe = load_recipe(name)
    if name.startswith("lift-cifar"):
        data = str(cifar_root)
    elif name == "demo":
        data = str(ballad_data)
    else:
        data = str(write_published_lists(tmp_path / name, name))
    if name == "demo":  # the tests' synthetic Fashion-MNIST has the real train and val splits, 300 test images
        plan = dry_run(recipe, data, tmp_path / "out", "cpu")  # still planned, the difference said
        assert re.search(r"test images is 300 in fmnist-lt, the published split has 10000", plan["data_error"])
        assert plan["data"] == [f"DIFFERS: {plan['data_error']}"] and len(plan["stages"]) == len(recipe.stages)
        recipe.published.test = 300
    plan = dry_run(recipe, data, tmp_path / "out", "cpu")
    assert len(plan["stages"]) == len(recipe.stages) and all(s["command"].count("ballad ") == 1 for s in plan["stages"])
    assert plan["data_error"] is None and plan["data"][0].startswith("read from ")
    assert len(plan["data"]) > 1 and all(line.endswith("as published") for line in plan["data"][1:])
    assert plan["weights"] and not any("does not resolve" in w for w in plan["weights"])


def test_a_bad_data_root_stops_before_anything_is_written_and_a_dry_run_still_plans(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["reproduce", "lift-imagenet-lt", "--data", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 1 and "is not a folder" in r.output and not out.exists()
    root = write_published_lists(tmp_path / "inet", "lift-imagenet-lt", train_delta=5)
    r = runner.invoke(app, ["reproduce", "lift-imagenet-lt", "--data", str(root), "--out", str(out), "--dry-run"])
    assert r.exit_code == 1  # the data is not the published split: said, and the plan printed all the same
    lines = r.output.splitlines()
    assert any(line.startswith("finetune: ") for line in lines) and any(line.startswith("evaluate: ") for line in lines)
    assert "train images is 115851" in " ".join(r.output.split()) and not out.exists()
