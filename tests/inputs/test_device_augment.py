"""`extract-features --augment-on device`: the views' parameters are the worker path's, the pixels within rounding."""

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import LTDataset, load_dataset
from ballad_cache.inputs.device_augment import DeviceAugment, assemble
from ballad_cache.inputs.reader import ImageRows, collate_groups
from ballad_cache.models.clip import load_model
from ballad_cache.pipelines.extract import ExtractConfig, augment_of, extract_features, split_rows
from ballad_cache.store.cache import FeatureCache
from bench.extract_views import photo_split

CPU = torch.device("cpu")


def replay_in_pil(image: Image.Image, p: list[float], size: int, mean, std) -> torch.Tensor:
    """The official view (RandomResizedCrop bicubic, flip, ColorJitter in its drawn order, ToTensor, Normalize)
    made with PIL from given parameters: written here, independently of the device path's pixels."""
    top, left, height, width, flip, *factors = p[:8]
    view = image.crop((int(left), int(top), int(left + width), int(top + height)))
    view = view.resize((size, size), Image.Resampling.BICUBIC)
    if flip > 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for fn in p[8:]:
        if int(fn) < 3:
            view = enhancers[int(fn)](view).enhance(factors[int(fn)])
    x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("size", [32, 224])
def test_device_views_draw_the_worker_paths_parameters_and_differ_only_in_rounding(tmp_path, size):
    """Catches a device path whose views are not the worker path's views: a crop box, flip, jitter factor or
    jitter order drawn otherwise (seeded per (seed, index, view) in another way, draws in another order) makes
    the replay in PIL of its parameters differ from the worker's row; pixels drifting past rounding (bilinear for
    bicubic at 224 px, jitter on 0-255 values, the flip or normalisation skipped) break the tolerance (mean |Δ| <
    0.03, max |Δ| < 0.1 in normalised units, std about 0.8); eval views must stay bitwise the worker's."""
    from torchvision import transforms as T

    from ballad_cache.inputs.transforms import official_train_transform

    split = photo_split(tmp_path / "jpeg", 4)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    augment = official_train_transform(size, mean, std)
    evaluate = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    rows = split_rows(4, 6)
    worker = ImageRows(split, rows, evaluate, augment, seed=3)
    device = ImageRows(split, rows, evaluate, augment, seed=3, device_views=DeviceAugment(augment))
    groups = [list(range(i * 7, i * 7 + 7)) for i in range(4)]
    a = collate_groups([worker.group(g) for g in groups])
    b = collate_groups([device.group(g) for g in groups])
    assert torch.equal(b["deferred"], torch.nonzero(a["view"] > 0).flatten())
    for r, params in zip(b["deferred"].tolist(), b["params"].tolist(), strict=True):
        image = split.load(int(a["index"][r]))
        replayed = replay_in_pil(image, params, size, mean, std)
        assert torch.equal(replayed, a["image"][r]), (r, params)  # the same PIL ops, then the same float32 ops
    assert len({tuple(p[:4]) for p in b["params"].tolist()}) == len(b["deferred"])  # every view its own crop
    assert {p[4] for p in b["params"].tolist()} == {0.0, 1.0}  # some views flipped, some not
    x = assemble(b, device.device_views, CPU)
    views = a["view"] > 0
    assert torch.equal(x[~views], a["image"][~views])
    d = (x[views] - a["image"][views]).abs()
    assert d.mean() < 0.03 and d.max() < 0.1, (d.mean(), d.max())


def test_device_path_refuses_steps_it_does_not_run():
    """Catches an augmentation with a step the device cannot run being accepted (its views would silently lack it)."""
    from torchvision import transforms as T

    with pytest.raises(ValueError, match="GaussianBlur"):
        DeviceAugment(T.Compose([T.RandomResizedCrop(32), T.GaussianBlur(3), T.Normalize([0.5] * 3, [0.5] * 3)]))
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        DeviceAugment(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="then the flip"):  # flip first: its draw and its pixels come first
        DeviceAugment(T.Compose([T.RandomHorizontalFlip(), T.RandomResizedCrop(32), T.ToTensor(), norm]))
    with pytest.raises(ValueError, match="nearest interpolation"):
        DeviceAugment(T.Compose([T.RandomResizedCrop(32, interpolation=T.InterpolationMode.NEAREST), norm]))
    loaded = load_model("ballad-micro")
    DeviceAugment(augment_of(loaded, ExtractConfig(augment="open_clip")))  # crop + normalise: runs


def _train_only(n: int) -> LTDataset:
    ds = load_dataset("fmnist-lt")
    train = ds.split("train").subset(np.arange(n))
    return LTDataset(ds.name, ds.classnames, {"train": train}, ds.templates)


def _rows(cache_dir) -> tuple[np.ndarray, np.ndarray]:
    cache = FeatureCache(cache_dir)
    feats, views = [], []
    for entry in cache.shard_files("train"):
        with h5py.File(cache.path / entry["file"]) as h:
            feats.append(h["features"][()])
            views.append(h["view"][()])
    return np.concatenate(feats), np.concatenate(views)


def test_extraction_with_device_views_is_fingerprinted_and_the_same_however_it_is_run(ballad_data, tmp_path):
    """Catches `--augment-on device` left out of the fingerprint (a worker-path cache would be resumed with device
    rows) or put into it where no augmented view exists (eval-only caches would be recomputed for nothing), rows
    that depend on the worker count or on a resumed shard, device rows that drift from the worker path's features
    (cosine > 0.99 on every augmented row), and a worker-path cache replaced by device rows without a word."""
    ds, loaded = _train_only(60), load_model("ballad-micro")
    base = dict(splits=("train",), train_views=3, shard_size=70, batch_size=32, dtype="float32")
    worker = ExtractConfig(workers=0, augment_on="worker", **base)
    m_worker = extract_features(ds, loaded, tmp_path / "worker", worker, CPU)
    m_device = extract_features(
        ds, loaded, tmp_path / "device", ExtractConfig(workers=0, augment_on="device", **base), CPU
    )
    assert m_worker["config_fingerprint"] != m_device["config_fingerprint"]
    assert m_device["config"]["augment_on"] == "device"
    f_worker, v = _rows(tmp_path / "worker")
    f_device, v_device = _rows(tmp_path / "device")
    assert np.array_equal(v, v_device)
    assert np.array_equal(f_worker[v == 0], f_device[v == 0])  # eval views: the worker's, bitwise
    cos = (f_worker[v > 0] * f_device[v > 0]).sum(1)
    assert cos.min() > 0.99 and not np.array_equal(f_worker[v > 0], f_device[v > 0])

    # two workers, then a resumed shard: bitwise the same rows
    again = ExtractConfig(workers=2, augment_on="device", **base)
    extract_features(ds, loaded, tmp_path / "again", again, CPU)
    assert np.array_equal(_rows(tmp_path / "again")[0], f_device)
    (tmp_path / "again" / "train-00001.h5").unlink()
    extract_features(ds, loaded, tmp_path / "again", again, CPU)
    assert np.array_equal(_rows(tmp_path / "again")[0], f_device)
    # the worker path's finished cache is neither resumed with device rows nor replaced without --overwrite
    device = ExtractConfig(workers=0, augment_on="device", **base)
    with pytest.raises(
        BalladError,
        match=r"finished cache made with other settings \(augment_on 'worker' -> "
        r"'device'\); pass `overwrite=True`",
    ):
        extract_features(ds, loaded, tmp_path / "worker", device, CPU)
    assert np.array_equal(_rows(tmp_path / "worker")[0], f_worker)
    # unfinished (no manifest): its shards of other settings are recomputed, and said
    (tmp_path / "worker" / "manifest.json").unlink()
    said = Said()
    extract_features(ds, loaded, tmp_path / "worker", device, CPU, progress=said)
    assert np.array_equal(_rows(tmp_path / "worker")[0], f_device)
    assert any("4 finished shard(s)" in m and "`augment_on='worker'`" in m for m in said.lines), said.lines
    # without augmented views the two paths are the same rows and the same fingerprint
    eval_only = {**base, "train_views": 0}
    a = extract_features(ds, loaded, tmp_path / "k0-w", ExtractConfig(workers=0, augment_on="worker", **eval_only), CPU)
    b = extract_features(ds, loaded, tmp_path / "k0-d", ExtractConfig(workers=0, augment_on="device", **eval_only), CPU)
    assert a["config_fingerprint"] == b["config_fingerprint"]


class Said:
    """A progress sink that keeps the lines logged to it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1, **fields) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_flip_that_never_flips_still_draws_as_pils_does(tmp_path):
    """Catches the flip's draw skipped when p = 0 (RandomHorizontalFlip draws torch.rand(1) whatever p is, so the
    jitter drawn after it would be another view's): the replayed parameters give the worker path's rows."""
    from torchvision import transforms as T

    split = photo_split(tmp_path / "jpeg", 2)
    mean, std = [0.5] * 3, [0.25] * 3
    augment = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.0),
            T.ColorJitter(0.4, 0.4, 0.4),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    evaluate = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(mean, std)])
    rows = split_rows(2, 3)
    worker = ImageRows(split, rows, evaluate, augment)
    device = ImageRows(split, rows, evaluate, augment, device_views=DeviceAugment(augment))
    for g in ([0, 1, 2, 3], [4, 5, 6, 7]):
        made, drawn = worker.group(g), device.group(g)
        image = split.load(made[0]["index"])
        for a, b in zip(made[1:], drawn[1:], strict=True):
            assert b["params"][4] == 0.0
            assert torch.equal(replay_in_pil(image, b["params"], 32, mean, std), a["image"])


def test_device_path_refusal_is_one_line_before_anything_is_written(ballad_data, tmp_path, monkeypatch):
    """Catches an augmentation the device cannot run failing late (after shards were written) or with a traceback."""
    from torchvision import transforms as T

    from ballad_cache.pipelines import extract as extract_module

    monkeypatch.setattr(extract_module, "augment_of", lambda loaded, config: T.Compose([T.RandomRotation(5)]))
    with pytest.raises(BalladError, match="`augment_on='device'` cannot run `augment='official'`.*RandomRotation"):
        extract_module.extract_features(
            load_dataset("fmnist-lt"),
            load_model("ballad-micro"),
            tmp_path / "out",
            ExtractConfig(train_views=2, augment_on="device", workers=0),
            CPU,
        )
    assert not (tmp_path / "out").exists()
