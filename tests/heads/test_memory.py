"""Heads that remember (heads/memory and their families in heads/families: tip, tip-f, gda, ncm) against arithmetic
written here, and through every command."""

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
from tests.rounding import EPS32, EPS64

runner = CliRunner()

# The heads compute in float32 what the references here compute in float64. Bounds, in eps32 units of the sizes
# they multiply: a normalisation moves each coordinate by (d + 2)·eps/2 of itself, a dot product of length n is off
# by n·eps/2 · Σ|xᵢyᵢ|, each further multiplication or addition by eps/2 of its result; written with eps (twice
# the unit roundoff), each bound holds twice over.


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def dot_slack(f: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """How far float32 f̂·rowᵀ can be from the float64 one (f normalised in float32, rows exact): the normalisation's
    (d + 2)·eps/2 and the dot product's d·eps/2 of Σ|f̂ᵢ rowᵢ|, with a multiplication to spare."""
    d = f.shape[1]
    return (2 * d + 3) * EPS32 * (np.abs(f) @ np.abs(rows).T)


def normalised_sum_slack(parts: np.ndarray, rounded: float) -> tuple[np.ndarray, np.ndarray]:
    """unit(Σ parts) in float64 and how far float32's can be from it per coordinate: each part off by `rounded` eps
    of each coordinate before the sum, n − 1 additions (n·eps of Σ|partsᵢ|), then δp ≤ (δs + |p|·‖δs‖) / ‖s‖ and
    the normalisation's own (d + 2)·eps."""
    total = parts.sum(axis=0)
    error = (len(parts) + rounded) * EPS32 * np.abs(parts).sum(axis=0)
    norm = np.linalg.norm(total)
    p = total / norm
    return p, (error + np.abs(p) * np.linalg.norm(error)) / norm + (len(p) + 2) * EPS32 * np.abs(p)


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
    # float32 rounding: an affinity f̂·k̂ carries both normalisations and its dot product; the kernel then
    # β·δa + (2β|1 − a| + 4)·eps relative (1 − a, β·, exp, · w, w's float32 n^−γ); the cache term, a sum of n
    # positive kernels, n·eps of itself more; the text logits `dot_slack`; α·, τ·(float32 prior) and the two
    # additions eps of their sizes
    affinity_slack = dot_slack(f, keys)
    text_logits = 100 * f @ t.T
    text_slack = 100 * dot_slack(f, t)
    for neighbours in (0, 7):
        config = AdapterConfig(head="tip", alpha=2.0, beta=3.0, gamma=0.5, adjust_tau=0.7, neighbours=neighbours)
        head = build_memory_head(train, config, context(lt_cache))
        ours = head.logits(test.features).double().numpy()
        affinity = f @ keys.T
        used = np.ones_like(affinity, dtype=bool)
        if neighbours:
            order = np.argsort(-affinity, axis=1)
            kth, nxt = order[:, neighbours - 1 : neighbours], order[:, neighbours : neighbours + 1]
            gap = np.take_along_axis(affinity, kth, 1) - np.take_along_axis(affinity, nxt, 1)
            # the same 7 keys in float32: the 7th beats the 8th by more than both their rounding
            assert (gap > np.take_along_axis(affinity_slack, kth, 1) + np.take_along_axis(affinity_slack, nxt, 1)).all()
            used = affinity >= np.take_along_axis(affinity, kth, 1)  # only the 7 nearest keys count
        kernel = np.where(used, np.exp(-3.0 * (1 - affinity)) * counts[labels] ** -0.5, 0.0)
        kernel_rel = 3.0 * affinity_slack + (2 * 3.0 * np.abs(1 - affinity) + 4) * EPS32
        one_hot = np.eye(10)[labels]
        cache_term = kernel @ one_hot
        term_slack = (kernel * kernel_rel) @ one_hot + used.sum(1, keepdims=True) * EPS32 * cache_term
        expected = text_logits + 2.0 * cache_term - 0.7 * log_prior
        sizes = np.abs(text_logits) + 2.0 * cache_term + 0.7 * np.abs(log_prior)
        slack = text_slack + 2.0 * term_slack + 3 * EPS32 * sizes
        assert (np.abs(ours - expected) <= slack).all(), neighbours


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
        # n_c keys weigh n_c · float32(n_c^−γ): one float32 rounding (eps/2) of the exact mass
        np.testing.assert_allclose(per_class, mass, rtol=EPS32, atol=0)


def test_ncm_is_the_normalised_class_means(lt_cache):
    """Catches ncm prototypes that are not the L2-normalised mean of each class's (normalised) features, or logits
    other than 100·f·Tᵀ + α·100·f·Pᵀ."""
    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    text = lt_cache.text_embeddings()
    x, y = unit(train.features.double().numpy()), train.labels.numpy()
    head = build_memory_head(train, AdapterConfig(head="ncm", alpha=1.5), context(lt_cache))
    stored = head.tensors["prototypes"].double().numpy()
    for c in range(10):  # the keys are normalised in float32 ((d + 2)·eps/2 each), then summed and normalised
        protos, slack = normalised_sum_slack(x[y == c], rounded=x.shape[1] + 2)
        assert (np.abs(stored[c] - protos) <= slack).all(), c
    f, t = unit(test.features.double().numpy()), text.double().numpy()
    expected = 100 * f @ t.T + 1.5 * 100 * f @ stored.T  # the stored prototypes: checked above
    sizes = 100 * np.abs(f @ t.T) + 1.5 * 100 * np.abs(f @ stored.T)
    slack = 100 * dot_slack(f, t) + 1.5 * 100 * dot_slack(f, stored) + 2 * EPS32 * sizes
    assert (np.abs(head.logits(test.features).numpy() - expected) <= slack).all()


def test_gda_is_lda_with_a_uniform_prior_and_the_stated_shrinkage(lt_cache):
    """Catches a gda head that is not LDA with uniform priors: class means M, Σ the mean of the per-class biased
    covariances shrunk to (1 − s)Σ + s·tr(Σ)/d·I, W = M Σ⁻¹, b = −½ diag(M Σ⁻¹ Mᵀ) (scikit-learn's
    LinearDiscriminantAnalysis(solver='lsqr', shrinkage=s, priors=uniform) up to its constant log prior)."""
    train = lt_cache.load_split("train")
    # the head's keys: its own float32 normalisation of the rows (the same op on the same rows, bitwise); from them on
    # both sides compute in float64
    x = torch.nn.functional.normalize(train.features.float(), dim=-1).double().numpy()
    y = train.labels.numpy()
    d, s = x.shape[1], 0.3
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
    covs = [np.cov(x[y == c].T, bias=True) for c in range(10)]
    cov = np.mean(covs, axis=0)
    cov = (1 - s) * cov + s * np.trace(cov) / d * np.eye(d)
    w = np.linalg.solve(cov, means.T).T
    b = -0.5 * np.einsum("cd,cd->c", w, means)
    head = build_memory_head(train, AdapterConfig(head="gda", shrinkage=s), context(lt_cache))
    # float64 sums of at most n + d terms, solved at Σ's condition number κ (relative error κ·(n + d)·eps64), then
    # stored as float32 (eps32/2 of each value)
    spread = np.linalg.cond(cov) * (len(x) + d) * EPS64
    for name, value in (("weight", w), ("bias", b)):
        slack = EPS32 * np.abs(value) + spread * np.abs(value).max()
        assert (np.abs(head.tensors[name].double().numpy() - value) <= slack).all(), name


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
        # the search runs the point's own float32 ops on the same rows (val is one affinity chunk), so bitwise
        assert torch.equal(logits, alone), config


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
    keys = head.tensors["keys"].double().numpy()
    for i in range(images):  # the mean of the 3 augmented views; float32 storage rounds each by eps/2
        expected, slack = normalised_sum_slack(feats[(index == i) & (view > 0)], rounded=1)
        assert (np.abs(keys[i] - expected) <= slack).all(), i
    assert head.tensors["values"].tolist() == [i % 3 for i in range(images)]
    eval_keys = build_memory_head(
        split,
        AdapterConfig(head="tip", key_view="eval"),
        HeadContext(torch.zeros(3, feats.shape[1]), class_log_prior([4, 4, 4])),
    )
    for i, row in enumerate(feats[view == 0]):
        expected, slack = normalised_sum_slack(row[None], rounded=1)
        assert (np.abs(eval_keys.tensors["keys"][i].double().numpy() - expected) <= slack).all(), i

    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    gda = build_memory_head(train, AdapterConfig(head="gda", alpha=0.3, adjust_tau=0.8), context(lt_cache))
    f, t = unit(test.features.double().numpy()), lt_cache.text_embeddings().double().numpy()
    w, b = gda.tensors["weight"].double().numpy(), gda.tensors["bias"].double().numpy()
    log_prior = prior(lt_cache).double().numpy()
    expected = 100 * f @ t.T + 0.3 * (f @ w.T + b) - 0.8 * log_prior
    sizes = 100 * np.abs(f @ t.T) + 0.3 * (np.abs(f @ w.T) + np.abs(b)) + 0.8 * np.abs(log_prior)
    slack = 100 * dot_slack(f, t) + 0.3 * dot_slack(f, w) + 4 * EPS32 * sizes
    assert (np.abs(gda.logits(test.features).numpy() - expected) <= slack).all()
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
