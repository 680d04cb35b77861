"""Nothing silently wrong: every class of fault is a one-line error or a correct result, never a traceback and
never a different result with exit 0. One test per class of fault, then a property test of random corruptions."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.heads.adapter import AdapterHead
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.registry import HeadContext
from ballad_cache.inputs.datasets import BadImageError, ImageSplit, yaml_dataset
from ballad_cache.models import load_model
from ballad_cache.pipelines.configs import PredictConfig
from ballad_cache.pipelines.export import Classifier, load_classifier
from ballad_cache.pipelines.predict import Predictions, predict_split, write_predictions
from ballad_cache.store.cache import FeatureCache, write_text_embeddings
from cli.main import app
from tests.conftest import longtail_features, make_cache, without_announcement

runner = CliRunner()


@pytest.fixture()
def cache(tmp_path) -> Path:
    d = longtail_features(np.random.default_rng(0), [40, 20, 10, 5], dim=16, per_class_eval=10, tail_shift=1.0)
    return make_cache(tmp_path / "cache", d["train"], d["val"], d["test"], d["text"][0])


def _fit(cache: Path, out: Path, *extra: str) -> object:
    args = ["fit-adapter", "--cache", str(cache), "--out", str(out), "--epochs", "3", "--batch-size", "16"]
    return runner.invoke(app, [*args, "--device", "cpu", *extra])


def _one_line_error(r: object, *needles: str) -> None:
    out = without_announcement(r.output)  # type: ignore[attr-defined]
    assert r.exit_code == 1, out  # type: ignore[attr-defined]
    assert "Traceback" not in out and out.strip().startswith("error:"), out
    for n in needles:
        assert n in out.replace("\n", ""), (n, out)


# ---------------------------------------------------------------------------------------------- 1. altered caches


@pytest.mark.parametrize("how", ["value", "labels"])
def test_a_shard_altered_in_place_is_refused_by_every_reader(cache, tmp_path, how):
    """Catches readers that trust the shard's fingerprint attribute instead of its bytes."""
    r = _fit(cache, tmp_path / "ad")
    assert r.exit_code == 0, r.output
    with h5py.File(cache / "test-00000.h5", "r+") as f:  # a valid file with one value changed
        if how == "value":
            f["features"][0, 0] = f["features"][0, 0] + 0.25
        else:
            f["labels"][...] = np.roll(f["labels"][()], 1)
    _one_line_error(runner.invoke(app, ["evaluate", "--cache", str(cache)]), "test-00000.h5", "sha256")
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad")])
    _one_line_error(r, "test-00000.h5")


def test_a_text_h5_of_another_extraction_is_refused(cache):
    """Catches a text.h5 from other templates of the same classes being accepted (accuracy at chance, exit 0)."""
    c = FeatureCache(cache)
    other = F.normalize(torch.randn(c.num_classes, c.manifest["embed_dim"]), dim=-1)
    write_text_embeddings(cache, other, other[:, None], c.classnames, ["a drawing of a {c}."])
    _one_line_error(runner.invoke(app, ["evaluate", "--cache", str(cache)]), "text.h5", "sha256")


# ---------------------------------------------------------------------------------------------- 2. no random models


def test_a_model_without_weights_stops_unless_random_weights_are_asked_for(tmp_path):
    """Catches local-dir folders without weights and open_clip architectures without --pretrained loading random."""
    loaded = load_model("ballad-micro")
    folder = tmp_path / "m"
    from ballad_cache.models import save_local_dir

    save_local_dir(loaded, loaded.model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(BalladError, match="holds no weights file.*`pretrained='none'`"):
        load_model(f"local-dir:{folder}")
    assert load_model(f"local-dir:{folder}", "none").random_weights
    with pytest.raises(BalladError, match="RN50 would start from random weights: pass `pretrained='openai'`"):
        load_model("RN50")
    assert load_model("ballad-micro").provenance()["random_weights"] is True  # random by design, and recorded


def test_a_crafted_pickle_as_weights_is_one_line(tmp_path):
    """Catches an UnpicklingError traceback from weights that weights_only refuses."""
    import pickle

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (os.system, ("echo pwned",))

    loaded = load_model("ballad-micro")
    folder = tmp_path / "m"
    from ballad_cache.models import save_local_dir

    save_local_dir(loaded, loaded.model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(BalladError, match="could not load model"):
        load_model(f"local-dir:{folder}")


# ---------------------------------------------------------------------------------------------- 3. huge images


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width×height pixels (no real pixel data behind it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_images_over_the_pixel_budget_are_bad_images(tmp_path):
    """Catches DecompressionBombError tracebacks and images just under PIL's limit decoded at full cost."""
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 400 MP: over PIL's own error threshold
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    split = ImageSplit(
        "x", np.zeros(2, np.int64), ["bomb.png", "big.png"], files=[str(tmp_path / n) for n in ("bomb.png", "big.png")]
    )
    with pytest.raises(BadImageError, match="over `max_pixels`"):
        split.load(0)
    with pytest.raises(BadImageError, match="300x200 pixels, over the budget of 50000"):
        split.load(1, max_pixels=50_000)
    assert split.load(1).size == (300, 200)


# ---------------------------------------------------------------------------------------------- 4. all-bad batches


def test_predict_skip_bad_survives_a_batch_of_only_bad_images(tmp_path):
    """Catches the encoder being handed an empty batch when every image of it is skipped."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    files = [str(tmp_path / "bad.png"), str(tmp_path / "good.png"), str(tmp_path / "bad.png")]
    split = ImageSplit("x", np.full(3, -1), files, files=files)
    loaded = load_model("ballad-micro")
    context = HeadContext(F.normalize(torch.randn(3, loaded.embed_dim), dim=-1), torch.zeros(3), folded=True)
    head = AdapterHead(AdapterConfig(), context, None)
    classifier = Classifier(loaded, head, context, ["a", "b", "c"], {})
    result = predict_split(
        classifier, split, PredictConfig(batch_size=1, workers=0, skip_bad=True), torch.device("cpu")
    )
    assert [r["path"] for r in result.rows] == [files[1]] and len(result.skipped) == 2


# ---------------------------------------------------------------------------------------------- 5. data, not markup


def test_brackets_in_paths_and_class_names_are_printed_as_they_are(tmp_path):
    """Catches rich markup eating '[bold]' from a class name or crashing on '[/]' in a path."""
    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        for c in ("[bold]cat", "x[red]dog"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "a.png")
    r = runner.invoke(app, ["data", "info", "--data", f"folder:{root}"])
    assert r.exit_code == 0, r.output
    assert "[bold]cat" in r.output and "x[red]dog" in r.output
    r = runner.invoke(app, ["cache", "info", "--cache", str(tmp_path / "[red]missing[/]")])
    _one_line_error(r, "[red]missing[/]")


# ---------------------------------------------------------------------------------------------- 6. the last step


def test_outputs_are_checked_before_the_work_and_any_file_name_round_trips(tmp_path):
    """Catches --out failures after the work, and the CSV writer dying on a name that is not valid UTF-8."""
    (tmp_path / "file").write_text("x")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for out in (tmp_path, tmp_path / "file" / "p.csv"):
        r = runner.invoke(app, ["predict", str(tmp_path / "a.png"), "--model", "local-dir:/nowhere", "--out", str(out)])
        _one_line_error(r, str(out.parent if out.name == "p.csv" else out))
    name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not valid UTF-8
    preds = Predictions([{"path": name, "pred": 0, "pred_name": "a", "prob": 1.0, "top_k": [["a", 1.0]]}], None, 1, [])
    write_predictions(preds, tmp_path / "p.csv", "csv", 1)
    assert b"caf\xe9.png" in (tmp_path / "p.csv").read_bytes()
    write_predictions(preds, tmp_path / "p.jsonl", "jsonl", 1)
    assert json.loads((tmp_path / "p.jsonl").read_text())["path"] == name


# ---------------------------------------------------------------------------------------------- 7. malformed files


def test_malformed_classifier_adapter_manifest_and_yaml_are_one_line(cache, tmp_path):
    """Catches KeyError/shape tracebacks from files that are valid JSON/safetensors but not what they claim."""
    r = _fit(cache, tmp_path / "ad")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad")])
    _one_line_error(r, "adapter.json", "config")
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "classnames"}))
    _one_line_error(runner.invoke(app, ["cache", "info", "--cache", str(cache)]), "manifest.json", "classnames")
    for body, needle in (
        ("- a\n- b\n", "top level"),
        ("root: .\nclassnames: c.txt\nsplits: [a]\n", "splits"),
        ("root: .\nclassnames: c.txt\nsplits: {train: t.txt}\ntemplates: {a: 1}\n", "templates"),
    ):
        (tmp_path / "d.yaml").write_text(body)
        (tmp_path / "c.txt").write_text("x\n")
        (tmp_path / "t.txt").write_text("a.png 0\n")
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        with pytest.raises(BalladError, match=needle):
            yaml_dataset(tmp_path / "d.yaml")


def _export_like(folder: Path, loaded, classes: int, prior: int) -> None:
    from ballad_cache.models import save_local_dir

    save_local_dir(loaded, loaded.model, folder)
    w = F.normalize(torch.randn(classes, loaded.embed_dim), dim=-1)
    save_file({"text": w.contiguous(), "log_prior": torch.zeros(prior)}, str(folder / "classifier.safetensors"))
    meta = {"format": 2, "classnames": ["a", "b", "c"], "adapter_config": AdapterConfig().to_dict()}
    (folder / "classifier.json").write_text(json.dumps(meta))


def test_a_classifier_whose_shapes_or_fields_disagree_is_refused(tmp_path):
    """Catches a log_prior of the wrong length broadcasting silently, and a classifier.json missing a field."""
    loaded = load_model("ballad-micro")
    _export_like(tmp_path / "e", loaded, 3, 3)
    assert load_classifier(f"local-dir:{tmp_path / 'e'}").context.text.shape[0] == 3
    _export_like(tmp_path / "p", loaded, 3, 2)
    with pytest.raises(BalladError, match="log_prior \\(2,\\)"):
        load_classifier(f"local-dir:{tmp_path / 'p'}")
    (tmp_path / "e" / "classifier.json").write_text(json.dumps({"format": 2, "classnames": ["a", "b", "c"]}))
    with pytest.raises(BalladError, match="adapter_config"):
        load_classifier(f"local-dir:{tmp_path / 'e'}")


def test_adapter_weights_or_config_changed_after_the_fit_are_refused(cache, tmp_path):
    """Catches an adapter whose weights (one bit) or config changed since the fit being used with exit 0."""
    assert _fit(cache, tmp_path / "ad").exit_code == 0
    weights = tmp_path / "ad" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's values: still a valid safetensors file
    weights.write_bytes(bytes(data))
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad")])
    _one_line_error(r, "adapter.safetensors", "sha256")
    assert _fit(cache, tmp_path / "ad2").exit_code == 0
    meta = json.loads((tmp_path / "ad2" / "adapter.json").read_text())
    meta["config"]["ratio"] = 0.3
    (tmp_path / "ad2" / "adapter.json").write_text(json.dumps(meta))
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad2")])
    _one_line_error(r, "adapter.json", "edited")


# ---------------------------------------------------------------------------------------------- 8. NaN and Inf


def test_nan_and_inf_are_refused_where_they_enter(cache, tmp_path):
    """Catches prob=nan results and NaN adapters becoming best/."""
    for args in (
        ["evaluate", "--cache", str(cache), "--tau", "nan"],
        ["sweep", "--cache", str(cache), "--out", str(tmp_path / "s"), "--lr", "0.1,nan"],
        ["fit-adapter", "--cache", str(cache), "--out", str(tmp_path / "x"), "--weight-decay", "inf"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "finite" in r.output, (args, r.output)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()
    r = _fit(cache, tmp_path / "ad")
    assert r.exit_code == 0
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    tensors["weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "ad" / "adapter.safetensors"))
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    meta.pop("weights_sha256")  # as an adapter written before the sha256 was recorded: the NaN check decides
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(meta))
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad")])
    _one_line_error(r, "NaN")


# ---------------------------------------------------------------------------------------------- 9. idle runs


def test_runs_that_train_nothing_say_so(cache, tmp_path):
    """Catches --epochs 1 (lr 0 all along), --ratio 0 with the text head, and --head-lr ignored at --lr 0."""
    r = _fit(cache, tmp_path / "one", "--epochs", "1")
    assert r.exit_code == 0 and "trains nothing" in r.output and "lr 0" in r.output
    r = _fit(cache, tmp_path / "zero", "--ratio", "0")
    assert r.exit_code == 2 and "--ratio" in r.output and "trains nothing" in r.output
    r = _fit(cache, tmp_path / "head", "--head", "cosine", "--lr", "0", "--head-lr", "0.5", "--schedule", "step")
    assert r.exit_code == 0 and "trains nothing" not in r.output, r.output
    head = load_file(str(tmp_path / "head" / "adapter.safetensors"))["head"]
    text = FeatureCache(cache).text_embeddings()
    # the head trained at --head-lr: an untrained one would differ from its init by normalisation rounding only,
    # about (D + 2)·eps = 2e-6 at D = 16, far below 1e-4; steps at lr 0.5 move it by orders of magnitude more
    assert not torch.allclose(head, F.normalize(text, dim=-1), atol=1e-4)


# ---------------------------------------------------------------------------------------------- property test


def _corrupt(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "flip", "zero-tail", "drop-key", "shape"])
    if path.suffix == ".json" and kind in ("drop-key", "shape"):
        body = json.loads(data)
        key = sorted(body)[int(rng.integers(len(body)))]
        if kind == "drop-key":
            body.pop(key)
        else:
            body[key] = [1, 2] if not isinstance(body[key], list) else {"x": 1}
        path.write_text(json.dumps(body))
        return f"{kind} {key}"
    if path.suffix == ".safetensors" and kind == "shape":
        tensors = load_file(str(path))
        tensors = {k: v.reshape(-1)[: v.numel() // 2].contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path))
        return kind
    if kind == "truncate" or len(data) < 16:
        path.write_bytes(bytes(data[: int(rng.integers(0, len(data)))]))
    elif kind == "zero-tail":
        path.write_bytes(bytes(data[: len(data) // 2]) + bytes(len(data) - len(data) // 2))
    else:
        for i in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
    return str(kind)


def _numbers(output: str) -> list[str]:
    """The figures a command printed (accuracies, file counts), without paths that differ between copies."""
    import re

    rows = [line for line in output.splitlines() if "│" in line or line.startswith("ok:")]  # table cells, verify
    return re.findall(r"(?<![\w/.-])\d+(?:\.\d+)?(?![\w/.-])", "\n".join(rows))


def test_random_corruptions_give_a_correct_result_or_one_line(cache, tmp_path):
    """Property: for each command, a randomly corrupted input file (truncated, bytes flipped, keys removed, wrong
    shapes) gives exit 0 with exactly the clean result, or exit 1 with one line; never a traceback or exit 0 with a
    different result."""
    import shutil

    assert _fit(cache, tmp_path / "ad").exit_code == 0
    commands = {
        "verify": lambda c, a: ["cache", "verify", "--cache", str(c)],
        "evaluate": lambda c, a: ["evaluate", "--cache", str(c), "--adapter", str(a)],
    }
    clean = {
        name: _numbers(without_announcement(runner.invoke(app, make(cache, tmp_path / "ad")).output))
        for name, make in commands.items()
    }
    assert all(clean.values()), clean
    files = [p for p in cache.iterdir() if p.suffix in (".h5", ".json")]
    files += [tmp_path / "ad" / "adapter.json", tmp_path / "ad" / "adapter.safetensors"]
    rng = np.random.default_rng(0)
    for trial in range(24):
        work = tmp_path / f"t{trial}"
        shutil.copytree(cache, work / "cache")
        shutil.copytree(tmp_path / "ad", work / "ad")
        target = files[trial % len(files)]
        victim = work / ("cache" if target.parent == cache else "ad") / target.name
        what = _corrupt(victim, rng)
        for name, make in commands.items():
            r = runner.invoke(app, make(work / "cache", work / "ad"))
            assert r.exception is None or isinstance(r.exception, SystemExit), (victim.name, what, name, r.exception)
            output = without_announcement(r.output)
            if r.exit_code == 0:
                assert _numbers(output) == clean[name], (victim.name, what, name, r.output)
            else:
                assert r.exit_code == 1 and "Traceback" not in output, (victim.name, what, name, r.output)
                assert len(output.strip().splitlines()) <= 3, (victim.name, what, name, r.output)  # one wrapped line


def test_odd_paths_and_files_a_new_user_handed_over_are_one_line(cache, tmp_path):
    """Catches tracebacks and silent results found by trying the CLI by hand: an --adapter that is a file, a
    manifest that is a JSON list, an infinite imbalance factor, --knn beyond the training rows, a non-cache folder
    given as --cache, and predict replacing an existing predictions file."""
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "afile")])
    _one_line_error(r, "afile")
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--knn", "100000"])
    _one_line_error(r, "--knn 100000 exceeds")
    assert _fit(cache, tmp_path / "ad").exit_code == 0
    _one_line_error(runner.invoke(app, ["cache", "info", "--cache", str(tmp_path / "ad")]), "fit-adapter run")
    r = runner.invoke(app, ["data", "info", "--data", "fmnist-lt:inf"])
    _one_line_error(r, "imbalance factor must be a finite number")
    (cache / "manifest.json").write_text("[]")
    _one_line_error(runner.invoke(app, ["cache", "info", "--cache", str(cache)]), "not a JSON object")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.csv").write_text("earlier predictions")
    r = runner.invoke(
        app, ["predict", str(tmp_path / "a.png"), "--model", "local-dir:/nowhere", "--out", str(tmp_path / "p.csv")]
    )
    _one_line_error(r, "already exists", "--overwrite")
    assert (tmp_path / "p.csv").read_text() == "earlier predictions"
