"""Phase A's tuning methods (`ballad_cache/tuning/`, `anatomy.py`, `models/tuned.py`, `pipelines/phase_a.py`):
LoRA's update is LIFT's `q + s·xAB`, folding methods save plain open_clip folders whose features equal the tuned
model's, the others save a base reference plain open_clip refuses and ballad re-applies, a method that cannot apply
is one line, a resume with other options is refused, and the phase-A head is what the cache scores."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model, local_dir_name
from ballad_cache.models.tuned import TUNED_META
from ballad_cache.pipelines.configs import ExtractConfig, FinetuneConfig
from ballad_cache.pipelines.finetune import finetune
from ballad_cache.tuning import TuningOptions
from ballad_cache.tuning.tuned import tune

CPU = torch.device("cpu")
SHORT = {"epochs": 2, "batch_size": 64, "lr": 0.05, "workers": 0, "max_steps": 3, "schedule": "step"}


def _features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_lora_update_is_lifts_q_and_v_update():
    """The parametrized in-projection computes LIFT's `q += s·x A B`, `v += s·x A B`, k untouched
    (shijxcs/LIFT models/peft_vit.py lines 374-379), with s = 1/r (peft_modules.py line 86)."""
    loaded = load_model("ballad-micro")
    model = loaded.model
    attn = model.visual.transformer.resblocks[0].attn
    base_w, base_b = attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone()
    tune(model, "lora", ["image"], TuningOptions(num_classes=40, rank=4))
    tuner = model.ballad_tuner
    for name in ("image_0_lora_q", "image_0_lora_v"):  # B starts at zero: give it values so the update shows
        torch.nn.init.normal_(getattr(tuner, name).lora_B)
    x = torch.randn(5, 64, dtype=torch.float64)
    got = F.linear(x, attn.in_proj_weight.double(), attn.in_proj_bias.double())
    q, k, v = F.linear(x, base_w.double(), base_b.double()).chunk(3, dim=-1)
    a_q, b_q = tuner.image_0_lora_q.lora_A.double(), tuner.image_0_lora_q.lora_B.double()
    a_v, b_v = tuner.image_0_lora_v.lora_A.double(), tuner.image_0_lora_v.lora_B.double()
    want = torch.cat([q + (x @ a_q @ b_q) / 4, k, v + (x @ a_v @ b_v) / 4], dim=-1)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(got, torch.cat([q, k, v], dim=-1), atol=1e-3)


@pytest.mark.parametrize("method", ["bitfit", "ssf", "lora"])
def test_folding_methods_save_plain_open_clip_folders(ballad_data, tmp_path, method):
    """Merged equals unmerged: plain open_clip loads the saved folder and its features equal the tuned model's, both
    towers (--tune-text), to 1e-5 of their size."""
    ds = load_dataset("fmnist-lt")
    loaded = load_model("ballad-micro")
    cfg = FinetuneConfig(method=method, tune_text=True, **SHORT)
    finetune(ds, loaded, tmp_path / "run", cfg, CPU)
    folder = tmp_path / "run" / "model-last"
    assert not (folder / TUNED_META).exists()
    plain, _, _ = open_clip.create_model_and_transforms(local_dir_name(folder))
    images = torch.randn(4, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ballad-micro")(["a photo of a cat", "a coat"])
    tuned_img, tuned_txt = _features(loaded.model, images, tokens)
    plain_img, plain_txt = _features(plain, images, tokens)
    for a, b in ((tuned_img, plain_img), (tuned_txt, plain_txt)):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    base_img, base_txt = _features(load_model("ballad-micro").model, images, tokens)
    assert (base_img - plain_img).abs().max() > 1e-4 and (base_txt - plain_txt).abs().max() > 1e-4  # it trained


@pytest.mark.parametrize("method", ["adaptformer", "vpt"])
def test_unfoldable_methods_keep_a_base_reference_open_clip_refuses(ballad_data, tmp_path, method):
    ds = load_dataset("fmnist-lt")
    loaded = load_model("ballad-micro")
    finetune(ds, loaded, tmp_path / "run", FinetuneConfig(method=method, **SHORT), CPU)
    folder = tmp_path / "run" / "model-last"
    with pytest.raises(Exception, match="config"):  # loudly: never the base model in its place
        open_clip.create_model_and_transforms(local_dir_name(folder))
    again = load_model(local_dir_name(folder))
    images = torch.randn(4, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ballad-micro")(["a coat"])
    want, _ = _features(loaded.model, images, tokens)
    got, _ = _features(again.model, images, tokens)
    assert torch.equal(want, got)
    base, _ = _features(load_model("ballad-micro").model, images, tokens)
    assert (base - got).abs().max() > 1e-4  # the tuner trained and is applied
    meta = json.loads((folder / TUNED_META).read_text())
    meta["base"]["weights_sha256"] = "0" * 64  # another base than the one it was tuned on
    (folder / TUNED_META).write_text(json.dumps(meta))
    with pytest.raises(BalladError, match="tuned on ballad-micro") as err:
        load_model(local_dir_name(folder))
    assert "\n" not in str(err.value)
    for damage in ({"options": {**meta["options"], "bottleneck": "x"}}, {"towers": ["audio"]}, {"format": 9}):
        (folder / TUNED_META).write_text(json.dumps({**meta, **damage}))
        with pytest.raises(BalladError, match="invalid description|upgrade ballad"):
            load_model(local_dir_name(folder))


def test_adaptformer_starts_as_the_base_model_and_sizes_by_lifts_rule():
    loaded = load_model("ballad-micro")
    loaded.model.eval()  # phase A's official mode
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = loaded.model.encode_image(images)
    tune(loaded.model, "adaptformer", ["image"], TuningOptions(num_classes=40))
    with torch.no_grad():
        after = loaded.model.encode_image(images)
    assert torch.equal(before, after)  # up-projection zero: step 0 is the base model
    branch = loaded.model.ballad_tuner.image_0_adaptformer
    layers = len(loaded.model.visual.transformer.resblocks)
    assert branch.down_proj.out_features == 2 ** math.floor(math.log2(40 / (2 * layers)))  # 2^floor(log2(C/2L))
    assert float(branch.scale) == 1.0
    with pytest.raises(BalladError, match="block width 64"):  # wider than the block: refused in one line
        tune(load_model("ballad-micro").model, "adaptformer", ["image"], TuningOptions(num_classes=40, bottleneck=65))


def test_a_method_that_cannot_apply_is_one_line_naming_the_tower_and_the_ones_that_do(ballad_data, tmp_path):
    ds = load_dataset("fmnist-lt")
    for method in ("adaptformer", "vpt"):
        with pytest.raises(BalladError) as err:
            finetune(ds, load_model("ballad-lite"), tmp_path / method, FinetuneConfig(method=method, **SHORT), CPU)
        message = str(err.value)
        assert "image tower EfficientNet" in message and "full, bitfit, ssf, lora" in message
        assert "\n" not in message


def test_convolutional_methods_train_ballad_lite(ballad_data, tmp_path):
    """bitfit, ssf and lora apply to EfficientNet-Lite0's convolutions and norms; the saved folder is plain."""
    ds = load_dataset("fmnist-lt")
    images = torch.randn(2, 3, 64, 64)
    start = load_model("ballad-lite")
    tokens = start.tokenizer(["a coat"])
    base, _ = _features(start.model, images, tokens)
    for method in ("bitfit", "ssf", "lora"):
        loaded = load_model("ballad-lite")
        cfg = FinetuneConfig(method=method, **{**SHORT, "batch_size": 16, "max_steps": 2, "lr": 0.5})
        finetune(ds, loaded, tmp_path / method, cfg, CPU)
        plain, _, _ = open_clip.create_model_and_transforms(local_dir_name(tmp_path / method / "model-last"))
        tuned, _ = _features(loaded.model, images, tokens)
        saved, _ = _features(plain, images, tokens)
        assert (tuned - saved).abs().max() <= 1e-5 * tuned.abs().max(), method
        assert (tuned - base).abs().max() > 1e-4, method


def test_options_a_method_does_not_read_and_fp16_official_are_refused():
    with pytest.raises(ValueError, match="bottleneck"):
        FinetuneConfig(method="lora", bottleneck=8)
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(method="lora", precision="fp16-official")
    with pytest.raises(ValueError, match="cosine_scale"):
        FinetuneConfig(cosine_scale=30.0)
    assert FinetuneConfig().towers == ["image", "text"]  # full trains both towers, as BALLAD
    assert FinetuneConfig(method="lora").towers == ["image"]  # LIFT freezes the text tower
    assert FinetuneConfig(method="lora", tune_text=True).towers == ["image", "text"]


def test_resume_with_other_options_is_refused_naming_them(ballad_data, tmp_path):
    ds = load_dataset("fmnist-lt")
    cfg = FinetuneConfig(method="adaptformer", classifier="cosine", **SHORT)
    finetune(ds, load_model("ballad-micro"), tmp_path / "run", cfg, CPU)
    other = FinetuneConfig(method="adaptformer", classifier="cosine", **{**SHORT, "lr": 0.1, "max_steps": 6})
    with pytest.raises(BalladError, match=r"lr=0.05` \(now `lr=0.1`\)") as err:
        finetune(ds, load_model("ballad-micro"), tmp_path / "run", other, CPU, resume=True)
    assert "max_steps" not in str(err.value) and "--max-steps" not in str(err.value)  # steers the run only
    same = FinetuneConfig(method="adaptformer", classifier="cosine", **{**SHORT, "max_steps": 6})
    assert finetune(ds, load_model("ballad-micro"), tmp_path / "run", same, CPU, resume=True)["steps"] == 6


def test_the_phase_a_cosine_head_is_what_the_cache_scores(ballad_data, tmp_path):
    """`evaluate` on the cache of the tuned model reports the phase-A head within 0.1 pt of what finetune measured."""
    from ballad_cache.pipelines.configs import EvalConfig
    from ballad_cache.pipelines.evaluate import evaluate_cache
    from ballad_cache.pipelines.extract import extract_features
    from ballad_cache.store.cache import FeatureCache

    ds = load_dataset("fmnist-lt")
    cfg = FinetuneConfig(
        method="adaptformer", classifier="cosine", loss="la", **{**SHORT, "max_steps": 0, "schedule": "epoch-end"}
    )
    summary = finetune(ds, load_model("ballad-micro"), tmp_path / "run", cfg, CPU)
    loaded = load_model(local_dir_name(tmp_path / "run" / "model"))
    assert loaded.class_head is not None
    extract_features(ds, loaded, tmp_path / "cache", ExtractConfig(splits=("train", "val"), train_views=0), CPU)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.manifest["text"]["class_embeddings"] == "phase-a cosine head"
    report = evaluate_cache(cache, None, EvalConfig(split="val"))["heads"]["zero-shot"]
    assert abs(report["top1"] - summary["best_val_top1"]) <= 0.1


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_a_tuner_and_a_cosine_head(ballad_data, tmp_path):
    import os

    from safetensors.torch import load_file

    from tests.conftest import run_ballad

    env = {**os.environ, "BALLAD_DATA": str(ballad_data), "OMP_NUM_THREADS": "1"}
    common = ["finetune", "--data", "fmnist-lt", "--model", "ballad-micro", "--method", "adaptformer"]
    common += ["--classifier", "cosine", "--loss", "la", "--max-steps", "3", "--lr", "0.05", "--batch-size", "64"]
    common += ["--workers", "0", "--device", "cpu", "--epochs", "1", "--schedule", "step"]
    one = run_ballad([*common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_ballad([*common, "--out", str(tmp_path / "two")], env, ranks=2, port=29581)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("tuner.safetensors", "class_head.safetensors"):
        a = load_file(str(tmp_path / "one" / "model-last" / name))
        b = load_file(str(tmp_path / "two" / "model-last" / name))
        assert set(a) == set(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5  # fp32 all-reduce order
    up = load_file(str(tmp_path / "one" / "model-last" / "tuner.safetensors"))["image_0_adaptformer.up_proj.weight"]
    assert up.abs().max() > 1e-4  # the steps moved the tuner (it starts at zero)


def test_a_tuned_folder_exports_and_predicts_as_the_adapter_scores_its_cache(ballad_data, tmp_path):
    """adaptformer + cosine head: extract, fit an adapter, export, predict. The exported classifier (the tuned
    folder's base reference and tuner, the head kept outside the tower) scores images as the adapter scores their
    cached features; plain open_clip refuses the export as it refuses the model."""
    from ballad_cache.heads.config import AdapterConfig
    from ballad_cache.pipelines.export import load_classifier, run_export
    from ballad_cache.pipelines.extract import extract_features
    from ballad_cache.pipelines.phase_b import fit_on_cache
    from ballad_cache.store.cache import FeatureCache

    ds = load_dataset("fmnist-lt")
    finetune(ds, load_model("ballad-micro"), tmp_path / "run", FinetuneConfig(method="adaptformer", **SHORT), CPU)
    model = local_dir_name(tmp_path / "run" / "model")
    ext = ExtractConfig(train_views=0, workers=0, batch_size=256, dtype="float32")
    extract_features(ds, load_model(model), tmp_path / "cache", ext, CPU)
    cache = FeatureCache(tmp_path / "cache")
    fit_on_cache(cache, AdapterConfig(epochs=2, batch_size=128), tmp_path / "adapter")
    run_export(model, tmp_path / "adapter", tmp_path / "export")
    with pytest.raises(Exception, match="config"):
        open_clip.create_model_and_transforms(local_dir_name(tmp_path / "export"))
    exported = load_classifier(local_dir_name(tmp_path / "export"))
    direct = load_classifier(model, tmp_path / "adapter")  # the tuned model with the adapter, unexported
    images = torch.stack([exported.loaded.preprocess_eval(ds.split("test").load(i)) for i in range(0, 300, 7)])
    with torch.no_grad():
        got = exported.logits(images)
        want = direct.logits(images)
        rows = cache.load_split("test").eval_view()
        cached = direct.score(rows.features[list(range(0, 300, 7))].float())
    assert torch.equal(got, want)
    assert (got.argmax(-1) == cached.argmax(-1)).float().mean() >= 0.95  # float32 cache vs fresh encoding
    assert (got - cached).abs().max() <= 1e-3 * cached.abs().max()


@pytest.mark.parametrize("method", ["ssf", "lora", "adaptformer"])
def test_methods_reach_a_hugging_face_text_tower(method):
    """--tune-text on ballad-tiny's MiniLM (BERT layers: separate q/k/v linears, post-norm): the method starts where
    LIFT's starts (AdaptFormer and LoRA as the base model) and, once its tensors move, changes the text features;
    a folding method's merged weights give the same features in plain open_clip's model."""
    loaded = load_model("ballad-tiny")
    model = loaded.model.eval()
    tokens = loaded.tokenizer(["a photo of a coat", "a sneaker"])
    with torch.no_grad():
        before = model.encode_text(tokens)
    tune(model, method, ["image", "text"], TuningOptions(num_classes=10))
    text_parts = [k for k in model.ballad_tuner.keys() if k.startswith("text_")]
    assert len(text_parts) >= len(model.text.transformer.encoder.layer)
    with torch.no_grad():
        start = model.encode_text(tokens)
        if method != "ssf":  # SSF starts at a random scale and shift near 1 and 0, as LIFT's
            assert torch.equal(before, start)
        for name in text_parts:
            for param in model.ballad_tuner[name].parameters():
                param.add_(0.05 * torch.randn_like(param))
        moved = model.encode_text(tokens)
    assert (moved - before).abs().max() > 1e-3
    if method in ("ssf", "lora"):
        from ballad_cache.tuning.tuned import plain_state_dict

        plain = load_model("ballad-tiny").model.eval()
        plain.load_state_dict(plain_state_dict(model))
        with torch.no_grad():
            merged = plain.encode_text(tokens)
        assert (merged - moved).abs().max() <= 1e-5 * moved.abs().max()
