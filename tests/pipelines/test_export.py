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
from tests.rounding import EPS32, FRESH32, HALF16, decided, feature_slack

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


def pooled_and_projection(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tower's output before its last projection and that projection as a matrix (`pooled @ P`; the
    identity where a timm tower has none), both float32."""
    import copy

    visual = model.visual
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):  # open_clip VisionTransformer
        bare = copy.deepcopy(model)
        bare.visual.proj = None
        return bare.encode_image(images), visual.proj.detach()
    pooled = visual.trunk(images)  # open_clip TimmModel: trunk, then head (empty without a projection)
    proj = getattr(visual.head, "proj", None)
    return pooled, proj.weight.detach().T if proj is not None else torch.eye(pooled.shape[1])


def exported_logit_slack(
    pooled: torch.Tensor, projection: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """How far the exported tower's float32 logits `scale · norm(pooled @ P') · rowsᵀ` can be from float64's
    `scale · norm(h) · rowsᵀ`, where P' is float32's rounding of the exact folded projection and h the exact
    projected features: P' is off by eps/2 of each entry and the matmul of width w by w·eps/2 of Σ|pooled||P'| (so
    each coordinate by e ≤ (w + 2)·eps · (|pooled| @ |P'|)); norm(·) then by (e + |ĥ|·‖e‖) / ‖h‖ plus its own
    (D + 2)·eps/2, the dot product with the rows by D·eps/2 of Σ|ĥ||row|, the scale by eps/2. In eps, twice over."""
    width, dim = projection.shape
    e = (width + 2) * EPS32 * (pooled.double().abs() @ projection.double().abs())
    norm = h.norm(dim=-1, keepdim=True)
    unit = h / norm
    moved = (e + unit.abs() * e.norm(dim=-1, keepdim=True)) / norm + (dim + 2) * EPS32 * unit.abs()
    r = rows.double().abs()
    logits = scale * (unit @ rows.double().T)
    return scale * (moved @ r.T + dim * EPS32 * (unit.abs() @ r.T)) + 2 * EPS32 * logits.abs()


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
        exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'e'}")  # plain open_clip
        exported = exported.eval()
        classifier = load_file(str(tmp_path / "e" / "classifier.safetensors"))
        got = 100.0 * F.normalize(exported.encode_image(images), dim=-1) @ classifier["text"].T
        # the reference in float64 from the tower's float32 output before its last projection, which export leaves
        # alone (the same ops on the same images in both models: bitwise)
        pooled, projection = pooled_and_projection(source, images)
        pooled_exported, projection_exported = pooled_and_projection(exported, images)
    assert torch.equal(pooled, pooled_exported)
    f = pooled.double() @ projection.double()  # the phase-A model's features
    h = ratio * f @ weight.double().T + (1 - ratio) * f
    expected = 100.0 * F.normalize(h, dim=-1) @ text.double().T
    slack = exported_logit_slack(pooled, projection_exported, h, classifier["text"], 100.0)
    assert ((got.double() - expected).abs() <= slack).all()
    assert (
        expected.argmax(1) != (100.0 * F.normalize(f, dim=-1) @ text.double().T).argmax(1)
    ).any()  # the adapter matters
    meta = json.loads((tmp_path / "e" / "classifier.json").read_text())
    assert meta["classnames"] == cache.classnames and meta["cache_fingerprint"] == cache.fingerprint
    assert meta["ratio"] == ratio and meta["logit_scale"] == 100.0
    counts = np.asarray(meta["train_class_counts"], dtype=np.float64)
    # float32 of numpy's float64 log, as `class_log_prior` makes it: bitwise
    assert torch.equal(classifier["log_prior"], torch.from_numpy(np.log(counts / counts.sum())).float())
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
    order = np.argsort(test.index.numpy())
    cached = adapter.logits(test.features)[order].double()
    # predict encodes the images afresh; the cache holds the same features stored as float16 (half an ulp, 2⁻¹¹ of
    # each coordinate), and float32's rounding of the tower, the folded projection and the head adds far less
    # (FRESH32): a row counts where its margin exceeds what such moves of the features can make
    slack = feature_slack(adapter.logits, test.features[order], HALF16, FRESH32)
    sure = decided(cached, slack)
    pred = np.array([int(r["pred"]) for r in rows])
    assert (pred[sure.numpy()] == cached.argmax(1).numpy()[sure.numpy()]).all()
    assert sure.double().mean() >= 0.9  # (all 300 rows here): the check decides nearly every row
    ours_top1 = 100 * np.mean([int(r["correct"]) for r in rows])
    cached_top1 = evaluate_cache(cache, adapter, EvalConfig())["heads"]["adapter"]["top1"]
    # only undecided rows may differ; a top-1 through a float32 mean is off by eps/2 of at most 100 besides
    assert abs(ours_top1 - cached_top1) <= 100 * float((~sure).double().mean()) + 100 * EPS32
    assert f"{ours_top1:.2f}" in r.output
    probs = np.array([[float(r[f"top{i}_prob"]) for i in (1, 2, 3)] for r in rows])
    # printed with 6 decimals (each up to 5e-7 up), of a float32 softmax summing to 1 within (C + 2)·eps
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 3 * 5e-7 + 12 * EPS32).all()


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
    assert torch.equal(weight, adapter.head.state()["head"])  # the trained rows, as fitted
    # which the fit stores normalised: unit within float32's normalisation rounding, (D + 2)·eps/2
    assert ((weight.double().norm(dim=-1) - 1).abs() <= (weight.shape[1] + 2) * EPS32).all()
    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'e'}")
    exported = exported.eval()
    source = load_model(f"local-dir:{vit_pipeline['model']}").model.eval()
    images = torch.stack([preprocess(load_dataset("fmnist-lt").split("test").load(i)) for i in range(0, 300, 10)])
    with torch.no_grad():
        got = 25.0 * F.normalize(exported.encode_image(images), dim=-1) @ weight.T
        pooled, projection = pooled_and_projection(source, images)
        pooled_exported, projection_exported = pooled_and_projection(exported, images)
    assert torch.equal(pooled, pooled_exported)
    # the adapter and the trained head on the phase-A model's features, in float64 (see the first test)
    f = pooled.double() @ projection.double()
    ratio = adapter.head.config.ratio
    h = ratio * f @ adapter.head.state()["weight"].double().T + (1 - ratio) * f
    expected = 25.0 * F.normalize(h, dim=-1) @ weight.double().T
    slack = exported_logit_slack(pooled, projection_exported, h, weight, 25.0)
    assert ((got.double() - expected).abs() <= slack).all()


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
        logits = classifier.logits(classifier.loaded.preprocess_eval(img)[None])
    # the snippet runs the head's float32 ops on the same features, but renormalises the text rows that a memory
    # head takes as stored: the text logits may move by (D + 2)·eps of Σ|f̂||t|, their sums with the head's term by
    # eps of their size; softmax(z + δ) / softmax(z) then lies within e^±2·max|δ|, each softmax rounding (C + 2)·eps
    image = scope["image"].double()
    text = classifier.context.text.double()
    shift = scope["scale"] * (image.shape[1] + 2) * EPS32 * (image.abs() @ text.abs().T) + 2 * EPS32 * logits.abs()
    ratio = float(torch.expm1(2 * shift.max())) + 2 * (len(text) + 2) * EPS32
    assert ((scope["probs"].double() - logits.softmax(-1).double()).abs() <= ratio * logits.softmax(-1)).all()
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
    # these heads read the tower's features unchanged: predict's logits are the adapter's head (what evaluate
    # scores with) on the phase-A tower's features of the same batches (256, in order), the same ops, bitwise
    source = load_model(f"local-dir:{vit_pipeline['model']}")
    split = load_dataset("fmnist-lt").split("test")
    images = torch.stack([source.preprocess_eval(split.load(i)) for i in range(len(split))])
    with torch.inference_mode():
        feats = torch.cat([source.model.eval().encode_image(images[a : a + 256]) for a in range(0, len(images), 256)])
        probs = adapter.logits(feats.float()).softmax(dim=1)
    top = probs.max(dim=1)
    assert [int(row["pred"]) for row in rows] == top.indices.tolist()
    assert [row["prob"] for row in rows] == [f"{float(p):.6f}" for p in top.values]
    zero = evaluate_cache(cache, None, EvalConfig())["heads"]["zero-shot"]
    assert evaluate_cache(cache, adapter, EvalConfig())["heads"]["adapter"]["per_class"] != zero["per_class"]
