"""export folds the adapter into the image tower exactly; predict agrees with evaluate on cached features."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model, save_local_dir
from ballad_cache.pipelines.evaluate import EvalConfig, evaluate_cache
from ballad_cache.pipelines.export import build_classifier, export_classifier, load_classifier
from ballad_cache.pipelines.extract import ExtractConfig, extract_features
from ballad_cache.pipelines.phase_b import fit_on_cache
from ballad_cache.store.cache import FeatureCache
from cli.main import app

runner = CliRunner()

# a timm tower configured without a projection: export has to append one
TIMM_NOPROJ = {
    "embed_dim": 96,  # timm test_resnet's num_features: the trunk's pooled output is the embedding
    "vision_cfg": {
        "timm_model_name": "test_resnet",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "none",
        "image_size": 32,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _register_timm() -> None:
    from ballad_cache.models import MODELS, register_model

    if "test-timm-noproj" not in MODELS:
        register_model(
            "test-timm-noproj", lambda: TIMM_NOPROJ, help="timm tower without a projection", random_init=True
        )


def _pipeline(root: Path, arch: str) -> dict[str, Path]:
    """A phase-A model (random weights), its cache of fmnist-lt, and an adapter fitted on it."""
    _register_timm()
    loaded = load_model(arch)
    save_local_dir(loaded, loaded.model, root / "a")
    model = load_model(f"local-dir:{root / 'a'}")
    dataset = load_dataset("fmnist-lt")
    extract_features(
        dataset, model, root / "cache", ExtractConfig(train_views=0, workers=0, batch_size=256), torch.device("cpu")
    )
    fit_on_cache(FeatureCache(root / "cache"), AdapterConfig(epochs=3, batch_size=128), root / "adapter")
    return {"model": root / "a", "cache": root / "cache", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def vit_pipeline(fmnist_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BALLAD_DATA", str(fmnist_dir))
    yield _pipeline(tmp_path_factory.mktemp("vit"), "ballad-micro")
    mp.undo()


@pytest.mark.parametrize("arch", ["ballad-micro", "test-timm-noproj"])
def test_exported_logits_equal_model_plus_adapter(arch, ballad_data, tmp_path, vit_pipeline):
    import open_clip

    paths = vit_pipeline if arch == "ballad-micro" else _pipeline(tmp_path, arch)
    r = runner.invoke(
        app,
        [
            "export",
            "--model",
            f"local-dir:{paths['model']}",
            "--adapter",
            str(paths["adapter"]),
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 0, r.output
    # model + adapter, written out here: x' = ratio * W f + (1 - ratio) * f, logits 100 * norm(x') · text
    source = load_model(f"local-dir:{paths['model']}").model.eval()
    weight = load_file(str(paths["adapter"] / "adapter.safetensors"))["weight"]
    ratio = json.loads((paths["adapter"] / "adapter.json").read_text())["config"]["ratio"]
    cache = FeatureCache(paths["cache"])
    text = cache.text_embeddings()
    ds = load_dataset("fmnist-lt")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'e'}")
    images = torch.stack([preprocess(ds.split("test").load(i)) for i in range(0, 300, 5)])
    with torch.no_grad():
        f = source.encode_image(images).double()  # the reference in float64
        h = ratio * f @ weight.double().T + (1 - ratio) * f
        expected = 100.0 * F.normalize(h, dim=-1) @ text.double().T
        exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'e'}")  # plain open_clip
        classifier = load_file(str(tmp_path / "e" / "classifier.safetensors"))
        got = 100.0 * F.normalize(exported.eval().encode_image(images), dim=-1) @ classifier["text"].T
    # float32 through the tower and its folded projection: relative error ~ d · 2⁻²⁴ (d ≤ 96 here) < 1e-5 of the
    # logits' scale; another adapter or a missed fold is off by far more than 1e-3 (the argmax check below)
    assert (got.double() - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    assert (
        expected.argmax(1) != (100.0 * F.normalize(f, dim=-1) @ text.double().T).argmax(1)
    ).any()  # the adapter matters
    meta = json.loads((tmp_path / "e" / "classifier.json").read_text())
    assert meta["classnames"] == cache.classnames and meta["cache_fingerprint"] == cache.fingerprint
    assert meta["ratio"] == ratio and meta["logit_scale"] == 100.0
    counts = np.asarray(meta["train_class_counts"], dtype=np.float64)
    torch.testing.assert_close(classifier["log_prior"], torch.from_numpy(np.log(counts / counts.sum())).float())
    n_params = sum(p.numel() for p in exported.visual.parameters())
    assert n_params == sum(p.numel() for p in source.visual.parameters()) + (96 * 96 if arch != "ballad-micro" else 0)


def test_export_refuses_an_adapter_of_another_models_cache(vit_pipeline, tmp_path):
    other = load_model("ballad-micro")
    torch.nn.init.normal_(other.model.visual.proj)
    save_local_dir(other, other.model, tmp_path / "other")
    with pytest.raises(BalladError, match="fitted on features of model"):
        build_classifier(f"local-dir:{tmp_path / 'other'}", vit_pipeline["adapter"])
    r = runner.invoke(
        app,
        [
            "export",
            "--model",
            f"local-dir:{tmp_path / 'other'}",
            "--adapter",
            str(vit_pipeline["adapter"]),
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 1 and str(vit_pipeline["adapter"]) in r.output and "other" in r.output
    assert not (tmp_path / "e" / "classifier.json").exists()


def test_predict_agrees_with_evaluate_and_writes_top_k(vit_pipeline, ballad_data, tmp_path):
    export_classifier(build_classifier(f"local-dir:{vit_pipeline['model']}", vit_pipeline["adapter"]), tmp_path / "e")
    out = tmp_path / "preds.csv"
    args = ["predict", "--model", f"local-dir:{tmp_path / 'e'}", "--data", "fmnist-lt", "--split", "test"]
    r = runner.invoke(app, [*args, "--out", str(out), "--top-k", "3", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 300
    assert list(rows[0])[:10] == [
        "path",
        "pred",
        "pred_name",
        "prob",
        "top1_name",
        "top1_prob",
        "top2_name",
        "top2_prob",
        "top3_name",
        "top3_prob",
    ]
    assert {"label", "label_name", "correct"} <= set(rows[0])
    cache = FeatureCache(vit_pipeline["cache"])
    adapter = load_adapter(vit_pipeline["adapter"], cache)
    test = cache.load_split("test")
    cached_pred = adapter.logits(test.features).argmax(1).numpy()[np.argsort(test.index.numpy())]
    pred = np.array([int(r["pred"]) for r in rows])
    assert (pred == cached_pred).mean() >= 0.995  # fp16 cache vs fp32 features: a near-tie may flip
    ours_top1 = 100 * np.mean([int(r["correct"]) for r in rows])
    cached_top1 = evaluate_cache(cache, adapter, EvalConfig())["heads"]["adapter"]["top1"]
    assert abs(ours_top1 - cached_top1) <= 0.3
    assert f"{ours_top1:.2f}" in r.output
    probs = np.array([[float(r[f"top{i}_prob"]) for i in (1, 2, 3)] for r in rows])
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-5).all()


def test_predict_on_files_folders_and_lists_with_tau_and_bad_images(vit_pipeline, ballad_data, tmp_path):
    from PIL import Image

    ds = load_dataset("fmnist-lt")
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(4):
        ds.split("test").load(i * 30).save(tmp_path / "imgs" / "sub" / f"{i}.png")
    Image.new("RGB", (28, 28)).save(tmp_path / "single.png")
    (tmp_path / "list.txt").write_text("single.png\nimgs/sub/0.png\n")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    base = ["predict", "--model", f"local-dir:{vit_pipeline['model']}", "--adapter", str(vit_pipeline["adapter"])]
    base += ["--workers", "0", "--device", "cpu"]
    inputs = [str(tmp_path / "imgs"), str(tmp_path / "list.txt")]
    r = runner.invoke(app, [*base, *inputs, "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and "broken.png" in r.output and "--skip-bad" in r.output
    assert not (tmp_path / "p.csv").exists()
    r = runner.invoke(app, [*base, *inputs, "--out", str(tmp_path / "p.jsonl"), "--format", "jsonl", "--skip-bad"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and sum("skipped" in x for x in lines) == 1
    assert all(len(x["top_k"]) == 5 for x in lines if "skipped" not in x)
    plain = [x["pred"] for x in lines if "skipped" not in x]
    r = runner.invoke(
        app, [*base, *inputs, "--out", str(tmp_path / "t.jsonl"), "--format", "jsonl", "--skip-bad", "--tau", "5"]
    )
    assert r.exit_code == 0, r.output
    tail = [json.loads(x)["pred"] for x in (tmp_path / "t.jsonl").read_text().splitlines() if "skipped" not in x]
    counts = FeatureCache(vit_pipeline["cache"]).train_counts
    assert tail != plain  # --tau is applied
    assert np.mean(counts[tail]) < np.mean(counts[plain])  # and pushes predictions towards rarer classes
    model = ["--model", f"local-dir:{vit_pipeline['model']}", "--out", str(tmp_path / "q.csv")]
    r = runner.invoke(app, ["predict", str(tmp_path / "nope"), *model])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "imgs"), *model])
    assert r.exit_code == 1 and "classifier.json" in r.output and "--adapter" in r.output


def test_export_and_predict_use_a_trained_cosine_head(vit_pipeline, ballad_data, tmp_path):
    import open_clip

    cache = FeatureCache(vit_pipeline["cache"])
    fit_on_cache(cache, AdapterConfig(epochs=3, batch_size=128, head="cosine"), tmp_path / "ad")
    adapter = load_adapter(tmp_path / "ad", cache)
    export_classifier(build_classifier(f"local-dir:{vit_pipeline['model']}", tmp_path / "ad"), tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "classifier.json").read_text())
    assert meta["head"] == "cosine" and meta["logit_scale"] == 25.0
    weight = load_file(str(tmp_path / "e" / "classifier.safetensors"))["head.head"]
    torch.testing.assert_close(weight, F.normalize(adapter.head.state()["head"], dim=-1))
    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'e'}")
    source = load_model(f"local-dir:{vit_pipeline['model']}").model.eval()
    images = torch.stack([preprocess(load_dataset("fmnist-lt").split("test").load(i)) for i in range(0, 300, 10)])
    with torch.no_grad():
        expected = adapter.logits(source.encode_image(images))
        got = 25.0 * F.normalize(exported.eval().encode_image(images), dim=-1) @ weight.T
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("head", ["text", "cosine", "tip", "gda", "ncm"])
def test_the_readme_snippet_gives_the_classifier_probabilities(head, vit_pipeline, ballad_data, tmp_path):
    """Catches a README snippet that hard-codes CLIP's scale 100 (wrong for a cosine head's 25) or leaves out a
    memory head's term (tip with 7 neighbours, γ and τ; gda; ncm)."""
    import re

    from PIL import Image

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"## Use your classifier.*?```python\n(.*?)```", readme, re.S).group(1)
    cache = FeatureCache(vit_pipeline["cache"])
    memory = {"alpha": 2.0, "gamma": 0.5, "neighbours": 7, "adjust_tau": 0.5} if head in ("tip", "gda", "ncm") else {}
    config = AdapterConfig(epochs=3, batch_size=128, head=head, head_scale=30.0, **memory)
    fit_on_cache(cache, config, tmp_path / "ad")
    export_classifier(build_classifier(f"local-dir:{vit_pipeline['model']}", tmp_path / "ad"), tmp_path / "e")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB")
    scope: dict = {"img": img}
    exec(snippet.replace("runs/classifier", str(tmp_path / "e")), scope)  # noqa: S102 - the README's own code
    classifier = load_classifier(f"local-dir:{tmp_path / 'e'}")
    with torch.no_grad():
        expected = classifier.logits(classifier.loaded.preprocess_eval(img)[None]).softmax(-1)
    torch.testing.assert_close(scope["probs"], expected, atol=1e-5, rtol=1e-4)
    assert scope["scale"] == (30.0 if head == "cosine" else 100.0)


@pytest.mark.parametrize("head", ["tip", "tip-f", "gda", "ncm"])
def test_export_and_predict_reproduce_evaluate_for_memory_heads(head, vit_pipeline, ballad_data, tmp_path):
    """Catches an exported memory head that predicts otherwise than `evaluate` scores it: missing or reordered
    `head.*` tensors, α/β/γ/τ not carried in classifier.json, or a tower that was folded although the head reads
    the unchanged features. Cached (float16) and freshly encoded features may flip a near-tie: >= 99.5% agree."""
    cache = FeatureCache(vit_pipeline["cache"])
    extra = {"epochs": 2, "batch_size": 128} if head == "tip-f" else {}
    config = AdapterConfig(head=head, alpha=2.0, gamma=0.5, adjust_tau=0.5, **extra)
    fit_on_cache(cache, config, tmp_path / "ad")
    adapter = load_adapter(tmp_path / "ad", cache)
    r = runner.invoke(
        app,
        [
            "export",
            "--model",
            f"local-dir:{vit_pipeline['model']}",
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 0, r.output
    stored = load_file(str(tmp_path / "e" / "classifier.safetensors"))
    assert {k for k in stored if k.startswith("head.")} == {f"head.{k}" for k in adapter.head.state()}
    out = tmp_path / "preds.csv"
    args = ["predict", "--model", f"local-dir:{tmp_path / 'e'}", "--data", "fmnist-lt", "--split", "test"]
    r = runner.invoke(app, [*args, "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    test = cache.load_split("test")
    cached = adapter.logits(test.features).argmax(1).numpy()[np.argsort(test.index.numpy())]
    assert (np.array([int(row["pred"]) for row in rows]) == cached).mean() >= 0.995
    zero = evaluate_cache(cache, None, EvalConfig())["heads"]["zero-shot"]
    assert evaluate_cache(cache, adapter, EvalConfig())["heads"]["adapter"]["per_class"] != zero["per_class"]
