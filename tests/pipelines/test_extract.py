"""`pipelines/extract.py`: rows, fingerprint, the refusal of another finished cache, and the runner's shards (a stub
encoder in place of the model's, so each row's feature is known)."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from ballad_cache.atomic import sha256_json
from ballad_cache.distributed import DistContext
from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import ImageSplit, LTDataset
from ballad_cache.inputs.device_augment import DeviceAugment
from ballad_cache.models.clip import load_model
from ballad_cache.pipelines.configs import ExtractConfig
from ballad_cache.pipelines.extract import (
    augment_of,
    augmented,
    config_fingerprint,
    device_views_of,
    draft_size,
    extract_features,
    refuse_other_finished_cache,
    resolve_splits,
    split_rows,
    templates_of,
)
from ballad_cache.store.cache import FeatureCache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def micro():
    return load_model("ballad-micro")


def pixel_dataset(train: int = 7, test: int = 3, classes: int = 3) -> LTDataset:
    """Gray 8×8 images whose every pixel is the image's row number (a feature can be traced back to its image)."""

    def split(name: str, n: int) -> ImageSplit:
        pixels = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 64, axis=1).reshape(n, 8, 8) * 10
        return ImageSplit(name, np.arange(n) % classes, [f"{name}/{i}.png" for i in range(n)], pixels=pixels)

    return LTDataset(
        "pixels", [f"class {c}" for c in range(classes)], {"train": split("train", train), "test": split("test", test)}
    )


class MeanEncoder:
    """A stub encoder: row i's feature is the unit vector along (1, mean pixel of the input); counts its rows."""

    device = CPU

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.rows = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.rows += len(images)
        feats = torch.zeros(len(images), self.dim, dtype=torch.float64)
        feats[:, 0] = 1.0
        feats[:, 1] = images.flatten(1).double().mean(dim=1)
        return torch.nn.functional.normalize(feats, dim=-1).float().numpy()


def test_split_rows_are_image_major_eval_view_first():
    assert split_rows(3, 2).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    assert split_rows(2, 0).tolist() == [[0, 0], [1, 0]]
    assert split_rows(0, 4).shape == (0, 2)


def test_empty_splits_mean_every_split_the_dataset_has_in_train_val_test_order():
    dataset = pixel_dataset()
    assert resolve_splits(ExtractConfig(workers=0), dataset).splits == ("train", "test")
    assert resolve_splits(ExtractConfig(workers=0, splits=("test",)), dataset).splits == ("test",)


def test_templates_come_from_the_config_else_the_dataset():
    dataset = replace(pixel_dataset(), templates=["a {c}.", "an image of a {c}."])
    assert templates_of(dataset, ExtractConfig(workers=0)) == ["a {c}.", "an image of a {c}."]
    assert templates_of(dataset, ExtractConfig(workers=0, templates="a drawing of a {c}.")) == ["a drawing of a {c}."]


def test_draft_size_is_the_models_input_side_only_with_draft(micro):
    assert draft_size(micro, ExtractConfig(workers=0)) == 0
    assert draft_size(micro, ExtractConfig(workers=0, draft=True)) == 32


def test_augmented_needs_train_views_and_the_train_split():
    assert augmented(ExtractConfig(workers=0, splits=("train", "test"), train_views=2))
    assert not augmented(ExtractConfig(workers=0, splits=("train",), train_views=0))
    assert not augmented(ExtractConfig(workers=0, splits=("test",), train_views=2))


def test_device_views_only_for_augmented_device_extraction(micro):
    config = ExtractConfig(workers=0, splits=("train",), train_views=2)
    assert isinstance(device_views_of(micro, config), DeviceAugment)
    assert device_views_of(micro, replace(config, augment_on="worker")) is None
    assert device_views_of(micro, replace(config, train_views=0)) is None


def test_an_augmentation_the_device_cannot_run_is_one_line_naming_the_worker_path(micro, monkeypatch):
    from torchvision import transforms as T

    from ballad_cache.pipelines import extract as extract_module

    monkeypatch.setattr(extract_module, "augment_of", lambda loaded, config: T.Compose([T.RandomRotation(10)]))
    with pytest.raises(BalladError, match="RandomRotation does not run on the device; use `augment_on='worker'`"):
        device_views_of(micro, ExtractConfig(workers=0, splits=("train",), train_views=1))


def test_fingerprint_holds_what_changes_the_features_and_not_how_the_work_is_spread(micro):
    """Catches a fingerprint that misses a setting (a resumed cache would mix two kinds of rows) or that holds batch
    size, workers or overwrite (a resume with more workers would recompute everything); and one that changed for
    caches made before `draft` and `augment_on` existed."""
    dataset = pixel_dataset()
    base = ExtractConfig(workers=0, splits=("train", "test"), train_views=2, augment_on="worker")
    templates = templates_of(dataset, base)
    fp = config_fingerprint(dataset, micro, base, templates)
    for same in (replace(base, batch_size=3), replace(base, workers=2), replace(base, overwrite=True)):
        assert config_fingerprint(dataset, micro, same, templates) == fp
    changes = [
        replace(base, train_views=3),
        replace(base, seed=1),
        replace(base, dtype="float32"),
        replace(base, shard_size=5),
        replace(base, skip_bad=True),
        replace(base, draft=True),
        replace(base, augment_on="device"),
        replace(base, augment="open_clip"),
        replace(base, splits=("train",)),
    ]
    prints = [config_fingerprint(dataset, micro, c, templates) for c in changes]
    assert fp not in prints and len(set(prints)) == len(prints)
    assert config_fingerprint(dataset, micro, base, ["a {c}."]) != fp
    # eval-only: the views' place does not matter, and the hash is the one made before the option
    eval_only = replace(base, train_views=0)
    assert config_fingerprint(dataset, micro, replace(eval_only, augment_on="device"), templates) == (
        config_fingerprint(dataset, micro, eval_only, templates)
    )
    splits = {s: sha256_json([dataset.split(s).labels.tolist(), dataset.split(s).paths]) for s in base.splits}
    before_options = {
        "dataset": "pixels",
        "splits": splits,
        "model": micro.provenance(),
        "preprocess": [repr(micro.preprocess_eval), repr(augment_of(micro, base))],
        "templates": templates,
        "dtype": "float16",
        "train_views": 2,
        "shard_size": base.shard_size,
        "seed": 0,
        "precision": "fp32",
        "skip_bad": False,
    }
    assert fp == sha256_json(before_options)[:16]


def test_another_finished_cache_is_refused_naming_what_differs(tmp_path):
    config = ExtractConfig(workers=0, splits=("train",), train_views=2)
    refuse_other_finished_cache(tmp_path, "f1", config)  # no manifest: nothing to refuse
    (tmp_path / "manifest.json").write_text("{not json")
    refuse_other_finished_cache(tmp_path, "f1", config)  # unreadable: an unfinished cache
    skipped = ("workers", "batch_size", "overwrite")  # how the work was spread: not recorded
    old = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in skipped}
    (tmp_path / "manifest.json").write_text(json.dumps({"config_fingerprint": "f1", "config": old}))
    refuse_other_finished_cache(tmp_path, "f1", config)  # the same cache: resumed
    with pytest.raises(BalladError, match=r"train_views 2 -> 0, seed 0 -> 3\); pass `overwrite=True`") as info:
        refuse_other_finished_cache(tmp_path, "f2", replace(config, train_views=0, seed=3))
    assert "\n" not in str(info.value)
    refuse_other_finished_cache(tmp_path, "f2", replace(config, overwrite=True))
    with pytest.raises(BalladError, match="another dataset, model or templates"):
        refuse_other_finished_cache(tmp_path, "f2", replace(config, batch_size=7))
    model = {"name": "ballad-micro", "checkpoint_sha256": "a" * 64}
    made = {"config_fingerprint": "f1", "config": old, "dataset": "fmnist-lt", "model": model, "templates": ["{c}"]}
    (tmp_path / "manifest.json").write_text(json.dumps(made))
    other = {"dataset": "fmnist-lt", "model": {**model, "name": "local-dir:a/model"}, "templates": ["a {c}"]}
    with pytest.raises(BalladError) as info:  # another model and templates: each named with both values
        refuse_other_finished_cache(tmp_path, "f2", config, other)
    message = str(info.value)
    assert "model 'ballad-micro (weights aaaaaaaaaaaa)' -> 'local-dir:a/model (weights aaaaaaaaaaaa)'" in message
    assert "templates ['{c}'] -> ['a {c}']" in message and "dataset 'fmnist-lt'" not in message
    del old["augment_on"]
    (tmp_path / "manifest.json").write_text(json.dumps({"config_fingerprint": "f1", "config": old}))
    with pytest.raises(BalladError, match=r"augment_on worker \(made before the option\) -> device"):
        refuse_other_finished_cache(tmp_path, "f2", config)


def test_runner_writes_each_row_of_each_shard_and_resumes_without_encoding_finished_shards(micro, tmp_path):
    """Catches rows written to the wrong shard or in the wrong order (the stub's feature names its image), a shard
    boundary crossing a batch, and a resume that encodes finished shards again."""
    dataset = pixel_dataset(train=7, test=3)
    config = ExtractConfig(
        workers=0, splits=("train", "test"), train_views=0, shard_size=3, batch_size=2, dtype="float32"
    )
    encoder = MeanEncoder(micro.embed_dim)
    manifest = extract_features(dataset, micro, tmp_path, config, CPU, encoder=encoder)
    assert encoder.rows == 10
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "test")] == [3, 1]
    assert manifest["train_class_counts"] == [3, 2, 2]
    cache = FeatureCache(tmp_path)
    train = cache.load_split("train")
    assert train.index.tolist() == list(range(7)) and train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    expected = [encoder(torch.stack([micro.preprocess_eval(dataset.split("train").load(i))]))[0] for i in range(7)]
    assert torch.equal(train.features, torch.from_numpy(np.stack(expected)))  # the same ops on the same pixels
    (tmp_path / "train-00001.h5").unlink()
    encoder.rows = 0
    extract_features(dataset, micro, tmp_path, config, CPU, encoder=encoder)
    assert encoder.rows == 3  # only the missing shard
    assert torch.equal(FeatureCache(tmp_path).load_split("train").features, train.features)


class OneOfTwoRanks(DistContext):
    """Rank `rank` of a world of 2 run in turn in this process: the barriers have nobody to wait for."""

    def barrier(self) -> None:
        pass


def test_each_rank_encodes_its_own_shards_and_only_rank_0_writes_the_manifest(micro, tmp_path):
    dataset = pixel_dataset(train=7, test=3)
    config = ExtractConfig(workers=0, splits=("train",), train_views=0, shard_size=2, batch_size=2)
    encoder = MeanEncoder(micro.embed_dim)
    assert extract_features(dataset, micro, tmp_path, config, CPU, dist=OneOfTwoRanks(1, 2), encoder=encoder) is None
    assert sorted(p.name for p in tmp_path.glob("train-*.h5")) == ["train-00001.h5", "train-00003.h5"]
    assert not (tmp_path / "manifest.json").exists() and encoder.rows == 3  # rows 2, 3 and 6
    manifest = extract_features(dataset, micro, tmp_path, config, CPU, dist=OneOfTwoRanks(0, 2), encoder=encoder)
    assert manifest is not None and manifest["splits"]["train"]["rows"] == 7 and encoder.rows == 3 + 4


def test_the_cache_records_the_precision_that_ran(micro, tmp_path, monkeypatch):
    """Catches a cache fingerprinted bf16 whose features were computed in float32 (bf16 asked for on CPU, where it
    runs), and one fingerprinted bf16 where fp32 ran instead (a GPU without bfloat16, played here on CPU)."""
    from ballad_cache.pipelines import extract as extract_module
    from ballad_cache.progress import NullProgress

    dataset = pixel_dataset(train=4, test=2)
    base = {"workers": 0, "splits": ("train",), "train_views": 0, "dtype": "float32"}
    fp32 = extract_features(dataset, micro, tmp_path / "fp32", ExtractConfig(**base), CPU)
    bf16 = extract_features(dataset, micro, tmp_path / "bf16", ExtractConfig(precision="bf16", **base), CPU)
    assert bf16["config"]["precision"] == "bf16" and bf16["config_fingerprint"] != fp32["config_fingerprint"]
    features_fp32 = FeatureCache(tmp_path / "fp32").load_split("train").features
    assert not torch.equal(FeatureCache(tmp_path / "bf16").load_split("train").features, features_fp32)

    class Said(NullProgress):
        lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    no_bf16 = extract_module.effective_precision
    monkeypatch.setattr(
        extract_module, "effective_precision", lambda device, p: "fp32" if p == "bf16" else no_bf16(device, p)
    )
    said = Said()
    ran = extract_features(
        dataset, micro, tmp_path / "gpu", ExtractConfig(precision="bf16", **base), CPU, progress=said
    )
    assert ran["config"]["precision"] == "fp32" and ran["config_fingerprint"] == fp32["config_fingerprint"]
    assert torch.equal(FeatureCache(tmp_path / "gpu").load_split("train").features, features_fp32)
    assert any("`precision='bf16'` cannot run on cpu; extracting in fp32" in line for line in said.lines), said.lines
