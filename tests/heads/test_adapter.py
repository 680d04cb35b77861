import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.heads.adapter import TrainRows, fit_adapters
from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.inputs.samplers import index_stream
from ballad_cache.pipelines.evaluate import EvalConfig, evaluate_cache
from ballad_cache.pipelines.phase_b import expand_grid, fit_on_cache
from ballad_cache.store.cache import FeatureCache
from cli.main import app
from tests.conftest import longtail_features, make_cache
from tests.rounding import EPS32, assert_trained_alike, float64_rows, training_bound

runner = CliRunner()
COUNTS = [200, 120, 80, 50, 30, 18, 12, 8, 6, 5]


# --------------------------------------------------------------------------- an independent official phase B
# Written from OLTR's data/ClassAwareSampler.py and BALLAD's train.py, without ballad's sampler or schedule code.


class RefRandomCycleIter:
    """OLTR's RandomCycleIter: starts at length - 1, reshuffles (python's random) each time it wraps."""

    def __init__(self, data, rnd):
        self.data_list = list(data)
        self.length = len(self.data_list)
        self.i = self.length - 1
        self.rnd = rnd

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        if self.i == self.length:
            self.i = 0
            self.rnd.shuffle(self.data_list)
        return self.data_list[self.i]


class RefClassAwareSampler:
    """OLTR's ClassAwareSampler: the iterators live as long as the sampler; each epoch restarts only the generator."""

    def __init__(self, labels, num_samples_cls, rnd):
        num_classes = len(np.unique(labels))
        self.class_iter = RefRandomCycleIter(range(num_classes), rnd)
        cls_data_list = [[] for _ in range(num_classes)]
        for i, label in enumerate(labels):
            cls_data_list[label].append(i)
        self.data_iter_list = [RefRandomCycleIter(x, rnd) for x in cls_data_list]
        self.num_samples_cls = num_samples_cls

    def epoch(self, n):
        out, j, tup = [], 0, None
        while len(out) < n:
            if j >= self.num_samples_cls:
                j = 0
            if j == 0:
                it = self.data_iter_list[next(self.class_iter)]
                tup = next(zip(*[it] * self.num_samples_cls))  # noqa: B905 - OLTR's idiom
            out.append(tup[j])
            j += 1
        return np.asarray(out)


def official_phase_b(features, labels, text, val_x, val_y, stream, epochs, batch, init, ratio=0.2, lr=0.2):
    """BALLAD train.py's phase B on fixed features: returns the weights after each epoch, the kept ones, best epoch."""
    linear = nn.Linear(features.shape[1], features.shape[1], bias=False, dtype=init.dtype)
    with torch.no_grad():
        linear.weight.copy_(init)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.0)
    epoch_steps = int(len(labels) / batch)
    best_w, best_acc, best_epoch, per_epoch = linear.weight.detach().clone(), 0.0, 0, []

    def logits(x):
        h = ratio * linear(x) + (1 - ratio) * x
        return 100.0 * (h / h.norm(dim=-1, keepdim=True)) @ text.t()

    for epoch in range(1, epochs + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the official order
            sched.step()
        order = stream[epoch - 1]
        for step in range(epoch_steps):
            idx = torch.as_tensor(order[step * batch : (step + 1) * batch])
            loss = F.cross_entropy(logits(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_epoch.append(linear.weight.detach().clone())
        with torch.no_grad():
            acc = (logits(val_x).argmax(1) == val_y).float().mean().item()
        if acc > best_acc:
            best_acc, best_epoch, best_w = acc, epoch, linear.weight.detach().clone()
    return per_epoch, best_w, best_epoch


def test_fit_adapters_matches_an_independent_official_phase_b_at_every_epoch(lt_cache):
    """Catches, in phase B: another adapter form (bias, ratio, residual), SGD update (momentum, weight decay),
    schedule (per-step, the last epoch above 0), epoch length, logit scale or text head, and keeping another epoch
    than the strictly best on val, against `official_phase_b` written in this file from BALLAD `train.py`.

    Both run in float64 (`fit_adapters` trains in the rows' dtype), so they agree within float64's rounding of
    their steps (`training_bound`); each deviation above moves the weights by orders of magnitude more."""
    import random

    epochs, batch = 6, 48
    train, val = lt_cache.load_split("train"), lt_cache.load_split("val")
    labels = train.labels.numpy()
    ref_sampler = RefClassAwareSampler(labels, 4, random.Random(5))
    draws = int(len(labels) / batch) * batch
    stream = [ref_sampler.epoch(draws) for _ in range(epochs)]
    text = lt_cache.text_embeddings().double()
    torch.manual_seed(11)
    init = nn.Linear(32, 32, bias=False).weight.detach().double()
    val_x = val.features.double()
    ref_epochs, ref_best, ref_best_epoch = official_phase_b(
        train.features.double(), train.labels, text, val_x, val.labels, stream, epochs, batch, init
    )
    ours_epochs = []
    fit = fit_adapters(
        float64_rows(TrainRows.from_split(train)),
        text,
        [AdapterConfig(epochs=epochs, batch_size=batch)],
        val=(val_x, val.labels),
        stream=stream,
        init=init,
        on_epoch=lambda e, w: ours_epochs.append(w[0].clone()),
    )
    assert fit.steps == epochs * (len(labels) // batch)  # floor(N/B) full batches per epoch
    assert len(ours_epochs) == epochs
    terms = 32 + lt_cache.num_classes  # d + C: the longest sums of a step
    for epoch, (ours, ref) in enumerate(zip(ours_epochs, ref_epochs, strict=True), start=1):
        assert_trained_alike(ours, ref, init, fit.steps * epoch // epochs, terms)
    torch.testing.assert_close(ours_epochs[-1], ours_epochs[-2], atol=0, rtol=0)  # the last epoch runs at lr 0
    assert fit.best_epoch[0] == ref_best_epoch
    assert_trained_alike(fit.weights[0], ref_best, init, fit.steps, terms)
    assert not torch.allclose(init, ref_best, atol=1e-3)  # training moved the weights


def test_fit_adapters_own_sampler_drives_the_official_loop_to_the_same_weights(lt_cache):
    """Catches fit_adapters training on another stream than ballad's class-aware sampler gives (a sampler rebuilt
    per epoch inside the fit, a reseeded stream): the official loop, fed ballad's own stream, must reach the same
    weights as fit_adapters left to draw its batches itself."""
    epochs, batch = 4, 48
    train, val = lt_cache.load_split("train"), lt_cache.load_split("val")
    labels = train.labels.numpy()
    draws = int(len(labels) / batch) * batch
    stream = index_stream(labels, "class-aware", epochs, seed=0, samples_per_class=4, draws_per_epoch=draws)
    runs = labels[np.concatenate(stream)].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # the stream is the class-aware one (k draws per class visit)
    text = lt_cache.text_embeddings().double()
    torch.manual_seed(0)
    init = nn.Linear(32, 32, bias=False).weight.detach().double()
    val_x = val.features.double()
    ref_epochs, ref_best, _ = official_phase_b(
        train.features.double(), train.labels, text, val_x, val.labels, stream, epochs, batch, init
    )
    ours: list[torch.Tensor] = []
    fit = fit_adapters(
        float64_rows(TrainRows.from_split(train)),
        text,
        [AdapterConfig(epochs=epochs, batch_size=batch, seed=0)],
        val=(val_x, val.labels),
        init=init,
        on_epoch=lambda e, w: ours.append(w[0].clone()),
    )
    for epoch, (mine, ref) in enumerate(zip(ours, ref_epochs, strict=True), start=1):  # both float64, as above
        assert_trained_alike(mine, ref, init, fit.steps * epoch // epochs, 32 + lt_cache.num_classes)


def test_class_aware_cycles_persist_across_epochs_as_oltrs_do():
    """Catches a sampler that rebuilds its class cycle each epoch, or its per-class cycles: 768 images in batches
    of 64 give 192 visits an epoch, not a multiple of the 11 classes, so an epoch ends inside a pass over the
    classes, and the largest class's pass spans several epochs."""
    import random

    counts = [350, 170, 90, 60, 37, 23, 14, 9, 6, 5, 4]  # 768 images: 192 visits per epoch, 192 % 11 = 5
    labels = np.repeat(np.arange(len(counts)), counts)
    batch, epochs, k = 64, 10, 4
    draws = len(labels) // batch * batch
    ours = index_stream(labels, "class-aware", epochs, seed=2, samples_per_class=k, draws_per_epoch=draws)
    ref_sampler = RefClassAwareSampler(labels, k, random.Random(2))
    ref = [ref_sampler.epoch(draws) for _ in range(epochs)]
    for stream in (ours, ref):
        flat = np.concatenate(stream)
        assert all(len(e) == draws for e in stream)
        runs = labels[flat].reshape(-1, k)
        assert (runs == runs[:, :1]).all()  # k consecutive draws from one class per visit
        visits = runs[:, 0]
        for a in range(0, len(visits) - len(counts) + 1, len(counts)):  # the class cycle spans epoch boundaries
            assert sorted(visits[a : a + len(counts)]) == list(range(len(counts)))
        for c, n_c in enumerate(counts):
            mine = flat[labels[flat] == c]
            for a in range(0, len(mine) - n_c + 1, n_c):  # each class cycle too: whole passes over its images
                assert sorted(mine[a : a + n_c]) == list(np.flatnonzero(labels == c))
            assert len(np.unique(mine)) == min(n_c, len(mine))  # coverage: no repeat before a full pass
    ours_draws = np.bincount(labels[np.concatenate(ours)], minlength=len(counts))
    ref_draws = np.bincount(labels[np.concatenate(ref)], minlength=len(counts))
    assert np.abs(ours_draws - ref_draws).max() <= k  # the same class-balanced share, up to one visit
    # the largest class over 10 epochs: every draw a new image until its pass ends
    assert len(np.unique(np.concatenate(ours)[labels[np.concatenate(ours)] == 0])) == min(350, ours_draws[0])
    again = index_stream(labels, "class-aware", 2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, index_stream(labels, "class-aware", 2, seed=3), strict=True))


def test_per_step_options_match_a_plain_pytorch_loop(lt_cache):
    """Catches the per-step cosine (`schedule="step"`), the kept last partial batch or `select="last"` training
    otherwise than torch's SGD under a LambdaLR stepped after every batch; both in float64 (see the first test)."""
    cfg = AdapterConfig(epochs=3, batch_size=64, schedule="step", keep_last_batch=True, select="last")
    rows = float64_rows(TrainRows.from_split(lt_cache.load_split("train")))
    text = lt_cache.text_embeddings().double()
    stream = [np.random.default_rng(e).permutation(len(rows.image_labels)) for e in range(cfg.epochs)]
    ours = []
    fit = fit_adapters(rows, text, [cfg], on_step=lambda s, loss: ours.append(float(loss[0])), stream=stream)
    torch.manual_seed(cfg.seed)
    linear = nn.Linear(32, 32, bias=False).double()
    start = linear.weight.detach().clone()
    opt = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(stream) * -(-len(rows.image_labels) // 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / n)))
    labels = lt_cache.load_split("train").labels
    ref = []
    for order in stream:
        for a in range(0, len(order), 64):  # the last partial batch kept
            batch = torch.as_tensor(order[a : a + 64])
            x = rows.features[batch]
            h = F.normalize(cfg.ratio * linear(x) + (1 - cfg.ratio) * x, dim=-1)
            loss = F.cross_entropy(100 * h @ text.T, labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ref.append(loss.item())
    assert len(ours) == len(ref) == n == fit.steps
    terms = 32 + lt_cache.num_classes
    # each loss is rounded like the weights it is computed from: the same relative bound, on the losses' size
    assert np.abs(np.array(ours) - np.array(ref)).max() <= training_bound(n, terms) * np.abs(ref).max()
    assert_trained_alike(fit.weights[0], linear.weight.detach(), start, n, terms)
    assert fit.best_epoch == [cfg.epochs]


def test_official_epoch_needs_one_full_batch(lt_cache):
    """Catches an official epoch (floor(N/B) full batches) silently training on a partial batch when N < B."""
    rows = TrainRows.from_split(lt_cache.load_split("train"))
    with pytest.raises(BalladError, match="`keep_last_batch=True`"):
        fit_adapters(rows, lt_cache.text_embeddings(), [AdapterConfig(epochs=1, batch_size=10_000)])


def test_batched_sweep_equals_each_point_alone(lt_cache):
    """Catches points of one batched fit that interact (a shared learning rate, ratio or momentum buffer, a chunk
    boundary off by one): each point's weights and losses are the ones it gets alone. A batched matmul may block
    its sums otherwise than K separate ones, so the fits run in float64 and agree within `training_bound`."""
    from ballad_cache.heads.adapter import init_weight

    rows = float64_rows(TrainRows.from_split(lt_cache.load_split("train")))
    text = lt_cache.text_embeddings().double()
    grid = expand_grid(AdapterConfig(epochs=2, batch_size=64), ratio=[0.1, 0.4], lr=[0.05, 0.3])
    together = fit_adapters(rows, text, grid, chunk=len(grid))  # all four in one matmul, as on a GPU
    chunked = fit_adapters(rows, text, grid, chunk=3)  # a ragged split, as the CPU default may choose
    start = init_weight(32, grid[0].seed)
    terms = 32 + lt_cache.num_classes
    for k, cfg in enumerate(grid):
        alone = fit_adapters(rows, text, [cfg])
        assert_trained_alike(together.weights[k], alone.weights[0], start, alone.steps, terms)
        assert_trained_alike(chunked.weights[k], alone.weights[0], start, alone.steps, terms)
        bound = training_bound(alone.steps, terms) * np.abs(alone.losses[0]).max()
        assert np.abs(together.losses[k] - alone.losses[0]).max() <= bound
        assert np.abs(chunked.losses[k] - alone.losses[0]).max() <= bound
    assert not torch.allclose(together.weights[0], together.weights[3], atol=1e-3)  # the points really differ


def test_class_balanced_sampling_is_what_lifts_the_tail(tmp_path):
    # overlapping classes whose tail leans towards head prompts: the zero-shot head and an instance-sampled adapter
    # both favour the head; only balanced sampling moves the decision boundaries back towards the tail
    rng = np.random.default_rng(0)
    counts, dim = [300, 200, 120, 80, 50, 20, 12, 8, 6, 5], 32
    text = rng.normal(size=(10, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def sample(n_per):
        y = np.repeat(np.arange(10), n_per)
        partner = np.where(y >= 5, y - 5, y)
        return text[y] + 1.6 * (y >= 5)[:, None] * text[partner] + 0.4 * rng.normal(size=(len(y), dim)), y

    make_cache(tmp_path / "cache", sample(counts), sample([40] * 10), sample([40] * 10), text)
    cache = FeatureCache(tmp_path / "cache")
    few = {}
    for sampler in ("class-aware", "instance"):
        fit_on_cache(cache, AdapterConfig(epochs=10, batch_size=64, sampler=sampler), tmp_path / sampler)
        result = evaluate_cache(cache, load_adapter(tmp_path / sampler, cache), EvalConfig())
        few[sampler], few["zero-shot"] = result["heads"]["adapter"]["few"], result["heads"]["zero-shot"]["few"]
    assert few["class-aware"] >= few["zero-shot"] + 10.0
    assert few["class-aware"] >= few["instance"] + 10.0


def test_sweep_cli_ranks_saves_best_and_skips_finished_points(lt_cache, tmp_path):
    args = [
        "sweep",
        "--cache",
        str(lt_cache.path),
        "--out",
        str(tmp_path / "sweep"),
        "--ratio",
        "0.1,0.4",
        "--lr",
        "0.05,0.2",
        "--sampler",
        "class-aware,sqrt",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 to train" in r.output
    import json

    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    vals = [p["val"]["top1"] for p in results["points"]]
    assert len(vals) == 8 and vals == sorted(vals, reverse=True)
    assert (tmp_path / "sweep" / "best" / "adapter.safetensors").exists()
    assert (tmp_path / "sweep" / "heatmap.png").stat().st_size > 1000
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "8 already done, 0 to train" in r.output


def test_evaluate_cli_writes_results_and_refuses_foreign_adapter(lt_cache, tmp_path):
    r = runner.invoke(
        app,
        [
            "fit-adapter",
            "--cache",
            str(lt_cache.path),
            "--out",
            str(tmp_path / "ad"),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(lt_cache.path),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "ev"),
            "--tau",
            "1",
            "--knn",
            "5",
            "--plot",
        ],
    )
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert set(res["heads"]) == {"zero-shot", "adapter", "adapter+LA", "knn@5"}
    assert res["thresholds"] == {"many": 100, "few": 20} and res["train_class_counts"] == COUNTS
    assert (tmp_path / "ev" / "per_class.csv").read_text().count("\n") == 11
    assert (tmp_path / "ev" / "per_class.png").stat().st_size > 1000
    rng = np.random.default_rng(1)
    d = longtail_features(rng, COUNTS, dim=32, per_class_eval=5, tail_shift=1.0)
    make_cache(tmp_path / "other", d["train"], d["val"], d["test"], d["text"][0])
    with pytest.raises(BalladError, match="refit it"):
        load_adapter(tmp_path / "ad", FeatureCache(tmp_path / "other"))
    r = runner.invoke(app, ["evaluate", "--cache", str(tmp_path / "other"), "--adapter", str(tmp_path / "ad")])
    assert r.exit_code == 1 and "fitted on cache" in r.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["fit-adapter", "--ratio", "1.5"], "--ratio"),
        (["fit-adapter", "--epochs", "-1"], "--epochs"),
        (["fit-adapter", "--sampler", "magic"], "--sampler"),
        (["sweep", "--ratio", ""], "--ratio"),
        (["sweep", "--sampler", "class-aware,magic"], "--sampler"),
        (["sweep", "--ratio", "0.2,-0.1"], "--ratio"),
        (["sweep", "--epochs", "10,-2"], "--epochs"),
        (["sweep", "--lr", ","], "--lr"),
    ],
)
def test_bad_options_exit_2_naming_the_option(lt_cache, tmp_path, args, option):
    r = runner.invoke(app, [*args, "--cache", str(lt_cache.path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert option in r.output


def test_knn_backends_equal_the_vote_written_here(lt_cache):
    """Catches a kNN head with another neighbour set (k off by one, nearest by distance of unnormalised rows), another
    vote weight (no temperature, plain counts) or votes given to the wrong class, in either backend: both against
    the InstDisc vote Σ_{j ∈ top-k} exp(s_j / 0.07) · e_{y_j} computed here in float64."""
    from ballad_cache.heads.knn import knn_scores

    train, test = lt_cache.load_split("train"), lt_cache.load_split("test")
    k, classes = 7, lt_cache.num_classes
    sims = test.features.double() @ train.features.double().T
    top, nbrs = sims.topk(k, dim=1)
    expected = torch.zeros(len(test.labels), classes, dtype=torch.float64)
    expected.scatter_add_(1, train.labels.long()[nbrs], torch.exp(top / 0.07))
    args = (train.features, train.labels, test.features, classes, k)
    # a float32 similarity is off by at most d·eps/2 · Σ|xᵢyᵢ| (d = 32, under 2e-6), so exp(s / 0.07) by that / 0.07
    # relative (under 3e-5), and the float32 scores by one more rounding
    dim = train.features.shape[1]
    sim_slack = dim * EPS32 * (test.features.double().abs() @ train.features.double().abs().T)
    ranked = sims.topk(k + 1, dim=1)
    # the same k neighbours in float32 as here: the k-th beats the next by more than both their rounding
    cut = ranked.values[:, k - 1] - ranked.values[:, k]
    assert (cut > sim_slack.gather(1, ranked.indices[:, k - 1 : k + 1]).sum(dim=1)).all()
    rtol = float(sim_slack.gather(1, nbrs).max()) / 0.07 + 2 * EPS32
    for backend in ("faiss", "torch"):
        torch.testing.assert_close(knn_scores(*args, backend=backend).double(), expected, rtol=rtol, atol=0.0)
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn_scores(*args, backend="annoy")


def test_each_draw_picks_one_of_its_images_augmented_views_uniformly():
    """Catches phase B drawing the eval view where augmented views exist (the official phase B only sees augmented
    images), always the same view, a view of another image, or a biased pick: 6 images × (1 eval + 4 augmented
    views) stored shuffled, 20,000 draws of image 3."""
    from ballad_cache.store.cache import SplitFeatures

    images, views = 6, 5
    index = np.repeat(np.arange(images), views)
    view = np.tile(np.arange(views), images)
    order = np.random.default_rng(0).permutation(len(index))  # rows in no particular order, as shards may hold them
    index, view = index[order], view[order]
    split = SplitFeatures(
        torch.zeros(len(index), 4),
        torch.as_tensor(index % 3),
        torch.as_tensor(index),
        torch.as_tensor(view),
    )
    rows = TrainRows.from_split(split)
    assert rows.image_labels.tolist() == [i % 3 for i in range(images)]
    picked = rows.draw(np.full(20_000, 3), np.random.default_rng(1))
    assert set(index[picked].tolist()) == {3}
    counts = np.bincount(view[picked], minlength=views)
    assert counts[0] == 0  # never the eval view
    # each augmented view a quarter of the draws: 0.015 is 4.9 binomial std (sqrt(0.25 · 0.75 / 20000) = 0.0031) of
    # a share drawn from numpy's seeded generator, the same stream on every machine
    assert np.all(np.abs(counts[1:] / 20_000 - 0.25) < 0.015)
