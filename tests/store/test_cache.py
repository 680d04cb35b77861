import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model
from ballad_cache.pipelines.extract import ExtractConfig, extract_features
from ballad_cache.store.cache import FeatureCache
from cli.main import app
from tests.conftest import ROOT, run_ballad

runner = CliRunner()


def _extract(out: Path, **kw) -> FeatureCache:
    ds = load_dataset("fmnist-lt")
    loaded = load_model("ballad-micro")
    cfg = ExtractConfig(workers=0, batch_size=128, **{"train_views": 0, **kw})
    extract_features(ds, loaded, out, cfg, torch.device("cpu"))
    return FeatureCache(out)


@pytest.fixture()
def small_cache(ballad_data, tmp_path) -> FeatureCache:
    return _extract(tmp_path / "cache", splits=("train", "val"), shard_size=500, train_views=1)


def test_cached_features_match_the_encoders(small_cache, ballad_data):
    """Catches cached rows that are not the model's features of their images: another image, view or transform, or
    features left unnormalised. The reference runs the encoder's ops on the same batch (the cache's first batch of
    128 val rows), so its float32 features are bitwise the cache's before storage; float16 storage then moves each
    value by at most half an ulp, 2^-11 of its size (2^-25 below float16's normal range). The text embeddings are
    the prompt bank's, bitwise."""
    from ballad_cache.models.clip import PromptBank

    ds = load_dataset("fmnist-lt")
    loaded = load_model("ballad-micro")
    val = small_cache.load_split("val")
    assert val.index[:128].tolist() == list(range(128))
    images = torch.stack([loaded.preprocess_eval(ds.split("val").load(i)) for i in range(128)])
    with torch.inference_mode():
        ref = F.normalize(loaded.model.eval().encode_image(images).float(), dim=-1)
    assert ((val.features[:128] - ref).abs() <= ref.abs() * 2.0**-11 + 2.0**-25).all()
    bank = PromptBank(loaded, ds.classnames, ["a photo of a {c}."])
    with torch.inference_mode():
        text_ref = F.normalize(bank.encode(loaded.model, per_template=True).float().mean(dim=1), dim=-1)
    assert torch.equal(small_cache.text_embeddings(), text_ref)
    train = small_cache.load_split("train")
    assert len(train) == 2 * 1236 and set(train.view.tolist()) == {0, 1}
    assert small_cache.train_counts.tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert len(small_cache.shard_files("train")) == 5  # 2472 rows in shards of 500


def test_loading_returns_the_shard_files_rows_in_manifest_order(small_cache):
    import h5py

    whole = small_cache.load_split("train", dtype=torch.float16)
    files = sorted(small_cache.path.glob("train-*.h5"))
    assert [f.name for f in files] == [e["file"] for e in small_cache.shard_files("train")]
    rows = 0
    for f in files:  # read the HDF5 files directly, as any other tool would
        with h5py.File(f, "r") as h:
            n = h["labels"].shape[0]
            assert np.array_equal(whole.features[rows : rows + n].numpy(), h["features"][()])
            assert np.array_equal(whole.labels[rows : rows + n].numpy(), h["labels"][()])
            assert np.array_equal(whole.index[rows : rows + n].numpy(), h["index"][()])
            assert np.array_equal(whole.view[rows : rows + n].numpy(), h["view"][()])
            rows += n
    assert rows == len(whole) == 2472
    parts = list(small_cache.iter_shards("train", dtype=torch.float16))
    assert [len(p) for p in parts] == [500, 500, 500, 500, 472]


def test_readers_refuse_a_shard_of_another_extraction_and_foreign_class_names(small_cache):
    import h5py

    shard = small_cache.path / small_cache.shard_files("val")[0]["file"]
    with h5py.File(shard, "r+") as h:
        h.attrs["fingerprint"] = "0123456789abcdef"
    with pytest.raises(BalladError, match="val-00000.h5 does not match its sha256"):  # the bytes changed
        FeatureCache(small_cache.path).load_split("val")
    unhashed = FeatureCache(small_cache.path, verify_reads=False)  # the checks behind the hash
    with pytest.raises(BalladError, match="belongs to another extraction"):
        unhashed.load_split("val")
    with h5py.File(small_cache.path / "text.h5", "r+") as h:
        h.attrs["classnames"] = json.dumps([f"other {i}" for i in range(10)])
    with pytest.raises(BalladError, match="text.h5 does not match its sha256"):
        FeatureCache(small_cache.path).text_embeddings()
    with pytest.raises(BalladError, match="other classes"):
        unhashed.text_embeddings()


def test_rerun_skips_complete_shards(small_cache, ballad_data, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in small_cache.path.glob("*-*.h5")}
    again = _extract(small_cache.path, splits=("train", "val"), shard_size=500, train_views=1)
    after = {p.name: p.stat().st_mtime_ns for p in again.path.glob("*-*.h5")}
    assert before == after
    assert again.fingerprint == small_cache.fingerprint


def test_verify_catches_flipped_byte_and_truncation(small_cache):
    r = runner.invoke(app, ["cache", "verify", "--cache", str(small_cache.path)])
    assert r.exit_code == 0, r.output
    shard = small_cache.path / "train-00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = runner.invoke(app, ["cache", "verify", "--cache", str(small_cache.path)])
    assert r.exit_code == 1 and "train-00002.h5" in r.output
    shard.write_bytes(bytes(data[: len(data) // 3]))
    r = runner.invoke(app, ["cache", "verify", "--cache", str(small_cache.path)])
    assert r.exit_code == 1 and "train-00002.h5" in r.output
    with pytest.raises(BalladError, match="train-00002.h5"):
        FeatureCache(small_cache.path).load_split("train")


def test_missing_shard_nan_rows_and_other_format_version(small_cache):
    (small_cache.path / "val-00000.h5").rename(small_cache.path / "moved.h5")
    with pytest.raises(BalladError, match="val-00000.h5 is missing"):
        FeatureCache(small_cache.path).load_split("val")
    (small_cache.path / "moved.h5").rename(small_cache.path / "val-00000.h5")
    import h5py

    with h5py.File(small_cache.path / "val-00000.h5", "r+") as f:
        f["features"][3] = np.nan
    with pytest.raises(BalladError, match="val-00000.h5 does not match its sha256"):
        FeatureCache(small_cache.path).load_split("val")
    with pytest.raises(BalladError, match="val-00000.h5 holds NaN"):
        FeatureCache(small_cache.path, verify_reads=False).load_split("val")
    manifest = json.loads((small_cache.path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (small_cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BalladError, match="format version 99"):
        FeatureCache(small_cache.path)


def _cli_extract(out: Path, env: dict, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "extract-features",
        "--data",
        "fmnist-lt",
        "--model",
        "ballad-micro",
        "--out",
        str(out),
        "--shard-size",
        "400",
        "--batch-size",
        "50",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--train-views",
        "1",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill_9_then_rerun_recomputes_only_unfinished_shards(ballad_data, tmp_path):
    env = {**os.environ, "BALLAD_DATA": str(ballad_data)}
    ref = tmp_path / "ref"
    assert _cli_extract(ref, env).wait() == 0
    killed = tmp_path / "killed"
    proc = _cli_extract(killed, env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("train-*.h5"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in killed.glob("*-*.h5")}
    assert survivors and not (killed / "manifest.json").exists()
    rerun = _cli_extract(killed, env)
    output = rerun.communicate()[0].decode()
    assert rerun.returncode == 0, output
    assert f"train: {7 - len([s for s in survivors if s.startswith('train')])} shard(s) computed" in output
    for name, mtime in survivors.items():
        assert (killed / name).stat().st_mtime_ns == mtime  # finished shards were not rewritten
    a = json.loads((ref / "manifest.json").read_text())
    b = json.loads((killed / "manifest.json").read_text())
    assert [e["sha256"] for s in a["splits"].values() for e in s["shards"]] == [
        e["sha256"] for s in b["splits"].values() for e in s["shards"]
    ]
    assert a["fingerprint"] == b["fingerprint"]
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.slow
def test_two_rank_torchrun_extraction_matches_one_rank(ballad_data, tmp_path):
    """Catches rows that depend on the rank count: shards dealt to two ranks, each with its own augmented views
    made on the device (the default), give one rank's rows, bitwise."""
    env = {**os.environ, "BALLAD_DATA": str(ballad_data), "OMP_NUM_THREADS": "1"}
    common = [
        "extract-features",
        "--train-views",
        "2",
        "--data",
        "fmnist-lt",
        "--model",
        "ballad-micro",
        "--shard-size",
        "300",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--splits",
        "train,val",
    ]
    one = run_ballad([*common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr
    two = run_ballad([*common, "--out", str(tmp_path / "two")], env, ranks=2, port=29571)
    assert two.returncode == 0, two.stderr[-3000:]
    # the fingerprint names the content, not how many ranks wrote it
    assert FeatureCache(tmp_path / "one").fingerprint == FeatureCache(tmp_path / "two").fingerprint
    for split in ("train", "val"):
        a = FeatureCache(tmp_path / "one").load_split(split)
        b = FeatureCache(tmp_path / "two").load_split(split)
        oa, ob = torch.argsort(a.index * 3 + a.view), torch.argsort(b.index * 3 + b.view)
        assert torch.equal(a.index[oa], b.index[ob]) and torch.equal(a.labels[oa], b.labels[ob])
        assert torch.equal(a.view[oa], b.view[ob]) and (split == "val" or int(a.view.max()) == 2)
        # a shard's batches are the same whichever rank encodes it: the same ops in the same order, bitwise
        assert torch.equal(a.features[oa], b.features[ob])


def test_decoding_once_per_image_gives_the_rows_one_decode_per_row_gave(ballad_data, tmp_path):
    """Catches a decode-once reader whose rows differ in any bit from decoding every (image, view) row on its own:
    a view seeded otherwise, views reordered, a transform that altered the shared decoded image, rows of an image
    that straddles a batch or shard boundary lost or doubled. The reference is the row-by-row reader run here in
    the same batches (3 views per image, shards of 500 and batches of 50 rows cut through images)."""
    import h5py

    from ballad_cache.pipelines.extract import augment_of

    ds, loaded = load_dataset("fmnist-lt"), load_model("ballad-micro")
    cfg = ExtractConfig(
        splits=("train",), shard_size=500, train_views=2, batch_size=50, dtype="float32", workers=0, augment_on="worker"
    )
    extract_features(ds, loaded, tmp_path / "cache", cfg, torch.device("cpu"))
    cache = FeatureCache(tmp_path / "cache")
    split = ds.split("train")
    rows = np.stack([np.repeat(np.arange(len(split)), 3), np.tile(np.arange(3), len(split))], axis=1)
    augment = augment_of(loaded, cfg)

    def one_row(index: int, view: int) -> torch.Tensor:  # the reader before: a decode per (image, view) row
        image = split.load(index)
        if view == 0:
            return loaded.preprocess_eval(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((cfg.seed, index, view)) & 0x7FFF_FFFF)
            return augment(image)

    model = loaded.model.eval()
    for s, entry in enumerate(cache.shard_files("train")):
        path = cache.path / entry["file"]
        shard = list(range(s * 500, min((s + 1) * 500, len(rows))))
        expected = []
        for a in range(0, len(shard), 50):
            images = torch.stack([one_row(*rows[i]) for i in shard[a : a + 50]])
            with torch.inference_mode():
                expected.append(F.normalize(model.encode_image(images).float(), dim=-1))
        with h5py.File(path) as h:
            stored = torch.from_numpy(h["features"][()])
            assert np.array_equal(h["view"][()], rows[shard, 1])
        assert torch.equal(stored, torch.cat(expected)), path


def test_draft_decoding_is_within_its_stated_tolerance_and_leaves_small_images_alone(tmp_path):
    """Catches `--draft` reducing an image below the model's input (its shorter side must stay >= the size, twice
    that for augmented views), drifting further from a full decode than stated (eval view of a 500×375 JPEG at
    32 px: mean |Δ| < 0.03, max |Δ| < 0.15 in normalised units, whose std is about 0.8), or touching an image it
    cannot reduce (PNGs, JPEGs under twice the size decode bitwise as without it)."""
    from bench.extract_views import photo_split

    split = photo_split(tmp_path / "jpeg", 3)
    loaded = load_model("ballad-micro")
    for i in range(3):
        full, reduced = split.load(i), split.load(i, draft=32)
        assert full.size == (500, 375) and min(reduced.size) >= 32 and reduced.size[0] < 500
        assert min(split.load(i, draft=64).size) >= 64  # augmented views ask twice the input size
        a, b = loaded.preprocess_eval(full), loaded.preprocess_eval(reduced)
        assert (a - b).abs().mean() < 0.03 and (a - b).abs().max() < 0.15
        assert split.load(i, draft=200).size == (500, 375)  # 375 < 2 × 200: no reduction
    from PIL import Image

    Image.open(split.files[0]).save(tmp_path / "x.png")
    png = image_split_of(tmp_path / "x.png")
    assert np.array_equal(np.asarray(png.load(0, draft=32)), np.asarray(png.load(0)))


def image_split_of(path: Path):
    from ballad_cache.inputs.datasets import ImageSplit

    return ImageSplit("x", np.zeros(1, dtype=np.int64), [str(path)], files=[str(path)])


def test_cache_info_json_is_the_manifests_facts(small_cache):
    import json

    r = runner.invoke(app, ["cache", "info", "--cache", str(small_cache.path), "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    m = small_cache.manifest
    assert facts["fingerprint"] == m["fingerprint"] and facts["embed_dim"] == m["embed_dim"]
    assert {s: v["rows"] for s, v in facts["splits"].items()} == {s: v["rows"] for s, v in m["splits"].items()}
    assert facts["size_bytes"] == sum(p.stat().st_size for p in small_cache.path.iterdir() if p.is_file())
