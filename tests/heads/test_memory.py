"""Heads that remember (tip, tip-f, gda, ncm) against arithmetic written here, and through every command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ballad_cache.heads.config import AdapterConfig
from ballad_cache.heads.registry import HEADS, FitData, HeadContext
from ballad_cache.inputs.longtail import class_log_prior
from ballad_cache.pipelines.phase_b import expand_grid, family_grid
from ballad_cache.store.cache import SplitFeatures
from cli.main import app

runner = CliRunner()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prior(cache) -> torch.Tensor:
    return class_log_prior(cache.train_counts)


def context(cache) -> HeadContext:
    return HeadContext(cache.text_embeddings(), prior(cache))


def build_memory_head(train: SplitFeatures, config: AdapterConfig, ctx: HeadContext):
    """The head `config.head`'s family fits on `train`."""
    return HEADS.get(config.head).fit(FitData(train, ctx), config).head


def search_points(configs, train: SplitFeatures, val: SplitFeatures, ctx: HeadContext) -> list[torch.Tensor]:
    """Every point's val logits through its family's batched sweep, in `configs`' order."""
    out: dict[int, torch.Tensor] = {}
    for name in dict.fromkeys(c.head for c in configs):
        idx = [i for i, c in enumerate(configs) if c.head == name]
        for j, fitted in HEADS.get(name).sweep(FitData(train, ctx, val), [configs[i] for i in idx], lambda lg: lg):
            out[idx[j]] = fitted.val
    return [out[i] for i in range(len(configs))]


def test_tip_logits_are_the_formula(lt_cache):
    """Catches a tip head whose logits are not 100·f·Tᵀ + α·Σ_k exp(−β(1 − f·k))·n_c^−γ·e_{y_k} − τ·log prior over
    every key (neighbours 0) or over each query's nearest keys: another kernel, a lost γ, α or τ, neighbours taken
    by index instead of affinity."""
    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    text = lt_cache.text_embeddings()
    keys, labels = unit(train.features.double().numpy()), train.labels.numpy()
    counts = np.bincount(labels, minlength=10).astype(np.float64)
    f, t = unit(test.features.double().numpy()), text.double().numpy()
    log_prior = np.log(counts / counts.sum())
    for neighbours in (0, 7):
        config = AdapterConfig(head="tip", alpha=2.0, beta=3.0, gamma=0.5, adjust_tau=0.7, neighbours=neighbours)
        head = build_memory_head(train, config, context(lt_cache))
        ours = head.logits(test.features).double().numpy()
        affinity = f @ keys.T
        if neighbours:
            cut = np.sort(affinity, axis=1)[:, -neighbours][:, None]
            affinity = np.where(affinity >= cut, affinity, -np.inf)  # only the 7 nearest keys count
        kernel = np.exp(-3.0 * (1 - affinity)) * counts[labels] ** -0.5
        cache_term = kernel @ np.eye(10)[labels]
        expected = 100 * f @ t.T + 2.0 * cache_term - 0.7 * log_prior
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3)


def test_balancing_changes_the_per_class_key_mass_as_stated(lt_cache):
    """Catches a key cap that keeps more than K keys of a class, drops classes below K, or is not seeded, and class
    weights other than n_c^−γ (γ = 1: every class's keys weigh one in total)."""
    train = lt_cache.load_split("train")
    counts = np.array(lt_cache.train_counts)
    capped = build_memory_head(train, AdapterConfig(head="tip", keys_per_class=16), context(lt_cache))
    kept = np.bincount(capped.tensors["values"].numpy(), minlength=10)
    assert kept.tolist() == np.minimum(counts, 16).tolist()
    again = build_memory_head(train, AdapterConfig(head="tip", keys_per_class=16), context(lt_cache))
    assert torch.equal(again.tensors["keys"], capped.tensors["keys"])
    other = build_memory_head(train, AdapterConfig(head="tip", keys_per_class=16, seed=1), context(lt_cache))
    assert not torch.equal(other.tensors["keys"], capped.tensors["keys"])  # the seed draws the keys
    for gamma, mass in ((0.0, counts), (1.0, np.ones(10)), (0.5, np.sqrt(counts))):
        head = build_memory_head(train, AdapterConfig(head="tip", gamma=gamma), context(lt_cache))
        values = head.tensors["values"].numpy()
        per_class = np.bincount(values, weights=head.tensors["class_weight"].numpy()[values], minlength=10)
        np.testing.assert_allclose(per_class, mass, rtol=1e-5)


def test_ncm_is_the_normalised_class_means(lt_cache):
    """Catches ncm prototypes that are not the L2-normalised mean of each class's (normalised) features, or logits
    other than 100·f·Tᵀ + α·100·f·Pᵀ."""
    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    text = lt_cache.text_embeddings()
    x, y = unit(train.features.double().numpy()), train.labels.numpy()
    protos = unit(np.stack([x[y == c].mean(axis=0) for c in range(10)]))
    head = build_memory_head(train, AdapterConfig(head="ncm", alpha=1.5), context(lt_cache))
    np.testing.assert_allclose(head.tensors["prototypes"].numpy(), protos, atol=1e-6)
    f = unit(test.features.double().numpy())
    expected = 100 * f @ text.double().numpy().T + 1.5 * 100 * f @ protos.T
    np.testing.assert_allclose(head.logits(test.features).numpy(), expected, rtol=1e-4, atol=1e-3)


def test_gda_is_lda_with_a_uniform_prior_and_the_stated_shrinkage(lt_cache):
    """Catches a gda head that is not LDA with uniform priors: class means M, Σ the mean of the per-class biased
    covariances shrunk to (1 − s)Σ + s·tr(Σ)/d·I, W = M Σ⁻¹, b = −½ diag(M Σ⁻¹ Mᵀ) (scikit-learn's
    LinearDiscriminantAnalysis(solver='lsqr', shrinkage=s, priors=uniform) up to its constant log prior)."""
    train = lt_cache.load_split("train")
    x, y = unit(train.features.double().numpy()), train.labels.numpy()
    d, s = x.shape[1], 0.3
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
    covs = [np.cov(x[y == c].T, bias=True) for c in range(10)]
    cov = np.mean(covs, axis=0)
    cov = (1 - s) * cov + s * np.trace(cov) / d * np.eye(d)
    w = np.linalg.solve(cov, means.T).T
    b = -0.5 * np.einsum("cd,cd->c", w, means)
    head = build_memory_head(train, AdapterConfig(head="gda", shrinkage=s), context(lt_cache))
    np.testing.assert_allclose(head.tensors["weight"].numpy(), w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(head.tensors["bias"].numpy(), b, rtol=1e-4, atol=1e-3)


def test_the_batched_search_equals_each_point_alone(lt_cache):
    """Catches a search whose shared top affinities, cache terms or class means give another score than the point
    built and scored alone (a term reused across β, γ or key caps, the neighbour cut applied twice)."""
    train, val = lt_cache.load_split("train"), lt_cache.load_split("val").eval_view()
    configs = (
        expand_grid(
            AdapterConfig(head="tip"),
            alpha=[0.5, 2.0],
            beta=[1.0, 5.5],
            gamma=[0.0, 1.0],
            keys_per_class=[0, 8],
            neighbours=[0, 5],
            adjust_tau=[0.0, 1.0],
        )
        + expand_grid(AdapterConfig(head="gda"), alpha=[0.01, 0.1], shrinkage=[0.1, 0.5])
        + expand_grid(AdapterConfig(head="ncm"), alpha=[0.5, 2.0], adjust_tau=[0.0, 1.0])
    )
    assert len(configs) == 64 + 4 + 4
    batched = search_points(configs, train, val, context(lt_cache))
    for config, logits in zip(configs, batched, strict=True):
        alone = build_memory_head(train, config, context(lt_cache)).logits(val.features)
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-4)


def test_the_search_never_reads_the_test_split(lt_cache, tmp_path, monkeypatch):
    """Catches a search that scores, or so much as loads, the test split before its winner is chosen on val: the
    test split is loaded once, after ranking, for the winner alone."""
    from ballad_cache.store.cache import FeatureCache

    loads: list[str] = []
    original = FeatureCache.load_split

    def spy(self, name, *args, **kwargs):
        loads.append(name)
        if name == "test":
            assert (tmp_path / "sweep" / "results.csv").exists() is False
            ranked = sorted(
                json.loads(p.read_text())["val"]["top1"] for p in (tmp_path / "sweep" / "points").glob("*.json")
            )
            assert len(ranked) == len(configs)  # every point was scored on val before test is touched
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "load_split", spy)
    configs = family_grid("tip") + family_grid("gda") + family_grid("ncm")
    from ballad_cache.pipelines.phase_b import run_sweep

    result = run_sweep(lt_cache, configs, tmp_path / "sweep")
    assert loads.count("test") == 1 and loads.index("test") > loads.index("val")
    assert result.test is not None


@pytest.mark.parametrize("head", ["tip", "tip-f", "gda", "ncm"])
def test_every_command_takes_the_memory_heads(lt_cache, tmp_path, head):
    """Catches a memory head that fit-adapter, evaluate or the adapter file cannot carry: the adapter evaluate
    loads scores on val exactly as fit-adapter's record says."""
    out = tmp_path / head
    args = ["fit-adapter", "--cache", str(lt_cache.path), "--out", str(out), "--head", head, "--device", "cpu"]
    if head == "tip-f":
        args += ["--epochs", "3", "--batch-size", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["config"]["head"] == head
    ev = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(lt_cache.path),
            "--adapter",
            str(out),
            "--split",
            "val",
            "--out",
            str(tmp_path / f"ev-{head}"),
        ],
    )
    assert ev.exit_code == 0, ev.output
    scored = json.loads((tmp_path / f"ev-{head}" / "result.json").read_text())["heads"]["adapter"]
    assert scored["top1"] == pytest.approx(meta["val"]["top1"], abs=1e-9)
    zero = json.loads((tmp_path / f"ev-{head}" / "result.json").read_text())["heads"]["zero-shot"]
    assert scored["few"] != zero["few"]  # the head changed the tail's predictions


def test_family_all_ranks_every_family_together(lt_cache, tmp_path):
    """Catches `sweep --family all` leaving a family out, results.csv without each point's head, or best/ holding
    another point than the top of the ranking."""
    out = tmp_path / "all"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--cache",
            str(lt_cache.path),
            "--out",
            str(out),
            "--family",
            "all",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert {r["head"] for r in rows} == {"text", "cosine", "tip", "tip-f", "gda", "ncm"}
    assert {r["loss"] for r in rows if r["head"] == "text"} == {"ce", "la"}
    best = json.loads((out / "best" / "adapter.json").read_text())
    assert best["config"]["head"] == rows[0]["head"]
    assert best["val"]["top1"] == pytest.approx(float(rows[0]["val_top1"]), abs=0.01)
    bad = runner.invoke(
        app, ["sweep", "--cache", str(lt_cache.path), "--out", str(tmp_path / "x"), "--family", "tip", "--alpha", "1,2"]
    )
    assert bad.exit_code == 2 and "--alpha" in bad.output


def test_keys_are_the_mean_of_each_images_augmented_views_and_gda_logits_blend(lt_cache):
    """Catches keys built from the eval view (or one view) where augmented views exist, views of another image
    mixed in, `--key-view eval` ignored, and gda logits other than 100·f·Tᵀ + α·(f·Wᵀ + b) − τ·log prior."""
    rng = np.random.default_rng(0)
    images, views, dim = 12, 4, 8
    index = np.repeat(np.arange(images), views)
    view = np.tile(np.arange(views), images)
    feats = unit(rng.normal(size=(len(index), dim)))
    order = rng.permutation(len(index))
    split = SplitFeatures(
        torch.as_tensor(feats[order]).float(),
        torch.as_tensor(index[order] % 3),
        torch.as_tensor(index[order]),
        torch.as_tensor(view[order]),
    )
    config = AdapterConfig(head="tip")
    head = build_memory_head(split, config, HeadContext(torch.zeros(3, feats.shape[1]), class_log_prior([4, 4, 4])))
    expected = unit(np.stack([feats[(index == i) & (view > 0)].mean(axis=0) for i in range(images)]))
    np.testing.assert_allclose(head.tensors["keys"].numpy(), expected, atol=1e-6)
    assert head.tensors["values"].tolist() == [i % 3 for i in range(images)]
    eval_keys = build_memory_head(
        split,
        AdapterConfig(head="tip", key_view="eval"),
        HeadContext(torch.zeros(3, feats.shape[1]), class_log_prior([4, 4, 4])),
    )
    np.testing.assert_allclose(eval_keys.tensors["keys"].numpy(), feats[view == 0], atol=1e-6)

    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    gda = build_memory_head(train, AdapterConfig(head="gda", alpha=0.3, adjust_tau=0.8), context(lt_cache))
    f, t = unit(test.features.double().numpy()), lt_cache.text_embeddings().double().numpy()
    w, b = gda.tensors["weight"].double().numpy(), gda.tensors["bias"].double().numpy()
    expected = 100 * f @ t.T + 0.3 * (f @ w.T + b) - 0.8 * prior(lt_cache).double().numpy()
    np.testing.assert_allclose(gda.logits(test.features).numpy(), expected, rtol=1e-4, atol=1e-2)
    with pytest.raises(Exception, match="shrinkage"):
        AdapterConfig(head="gda", shrinkage=0.0)


def test_overflowing_settings_and_a_diverged_tip_f_are_refused(lt_cache, tmp_path):
    """Catches α or β finite in Python but inf in float32 (a head that scores near 0% without a word), and a tip-f
    whose keys went NaN being written as a finished adapter."""
    from ballad_cache.errors import BalladError
    from ballad_cache.options import OptionError
    from ballad_cache.pipelines.phase_b import fit_on_cache

    for field, value in (("alpha", 1e300), ("beta", 1e4)):
        with pytest.raises(OptionError, match=field):
            AdapterConfig(head="tip", **{field: value})
    config = AdapterConfig(head="tip-f", epochs=2, batch_size=64, head_lr=1e30)
    with pytest.raises(BalladError, match="tip-f diverged"):
        fit_on_cache(lt_cache, config, tmp_path / "ad")
    assert not (tmp_path / "ad" / "adapter.json").exists()
