import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model
from ballad_cache.pipelines.demo import phase_a_settings
from ballad_cache.pipelines.finetune import FinetuneConfig, finetune
from ballad_cache.pipelines.phase_a import load_checkpoint
from ballad_cache.progress import NullProgress
from tests.conftest import run_ballad

MODEL = "ballad-micro"  # fast; the first test and the demo test run ballad-tiny


class EpochWeights(NullProgress):
    """The model's weights at the end of each epoch, taken when phase A logs the epoch's line."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def log(self, message: str) -> None:
        if message.startswith("epoch "):
            epoch = int(message.split()[1].rstrip(":"))
            self.epochs[epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_short_run_raises_val_accuracy_and_writes_local_dir(ballad_data, tmp_path):
    """Catches model/ holding other weights than the best val epoch's (the last epoch's, or weights changed by the
    save), and model-last/ other than the last epoch's."""
    import open_clip

    ds = load_dataset("fmnist-lt")
    cfg = FinetuneConfig(
        epochs=3, batch_size=32, lr=3e-4, warmup_steps=10, workers=0, **phase_a_settings("ballad-tiny")
    )
    loaded = load_model("ballad-tiny")
    weights = EpochWeights(loaded.model)
    result = finetune(ds, loaded, tmp_path, cfg, torch.device("cpu"), progress=weights)
    assert sorted(weights.epochs) == [1, 2, 3]
    best = weights.epochs[result["best_epoch"]]
    for folder, expected in (("model", best), ("model-last", weights.epochs[3])):
        stored = load_file(str(tmp_path / folder / "open_clip_model.safetensors"))
        assert set(stored) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(stored[name], tensor), (folder, name)
    assert result["best_val_top1"] >= result["start"]["top1"] + 15.0  # observed 2.0 -> 30.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val" in r] == [0, 1, 2, 3]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    reloaded = load_model(f"local-dir:{tmp_path / 'model'}")
    assert (tmp_path / "model-last" / "open_clip_model.safetensors").exists()
    saved = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert model.visual.output_dim == 256


class StopAfterEpoch(NullProgress):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def log(self, message: str) -> None:
        if message.startswith(f"epoch {self.epoch}:"):
            raise KeyboardInterrupt


def test_official_phase_a_epochs_rates_and_eval_mode(ballad_data, tmp_path):
    """Catches, in phase A: ceil(N/B) steps (a kept last partial batch) instead of floor(N/B), a rate that is not
    CosineAnnealingLR(T_max=epochs) stepped at each epoch start (per-step cosine, stepped after the epoch, a last
    epoch above 0), and the model in train mode during training or validation."""
    import math

    ds = load_dataset("fmnist-lt")
    n_train = len(ds.split("train"))
    loaded = load_model(MODEL)
    modes = []
    loaded.model.visual.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    cfg = FinetuneConfig(epochs=3, batch_size=100, lr=0.03, workers=0, log_every=1)  # else the official defaults
    result = finetune(ds, loaded, tmp_path, cfg, torch.device("cpu"))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "lr" in x]
    assert result["steps"] == len(steps) == 3 * (n_train // 100)  # floor(N/B) full batches per epoch
    for x in steps:  # CosineAnnealingLR(T_max=3) stepped at each epoch start: epoch e runs at its cos(pi e / 3)
        assert x["lr"] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * x["epoch"] / 3)), abs=1e-12)
    assert [x["lr"] for x in steps][-1] == 0.0
    assert modes and not any(modes)  # the model never left eval mode, in training or validation
    # logging every 4 batches: one line per window, the window's mean loss, no batch left out
    finetune(
        ds,
        load_model(MODEL),
        tmp_path / "w",
        FinetuneConfig(epochs=1, batch_size=100, workers=0, log_every=4),
        torch.device("cpu"),
    )
    windows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    windows = [x for x in windows if "lr" in x]
    assert len(windows) == -(-(n_train // 100) // 4) and sum(x["batches"] for x in windows) == n_train // 100


def test_official_augmentation_is_ballads_transform():
    """Catches a train transform other than BALLAD `data/dataloader.py` `get_data_transform('train')`
    (RandomResizedCrop scale 0.5-1 bicubic, flip, ColorJitter 0.4/0.4/0.4), written here with torchvision:
    another crop scale, interpolation, jitter or normalisation gives other pixels for the same seed."""
    from PIL import Image
    from torchvision import transforms as T

    from ballad_cache.inputs.transforms import train_transform

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = train_transform("official", {"size": 32, "mean": mean, "std": std}, lambda im: None)
    reference = T.Compose(  # BALLAD data/dataloader.py, get_data_transform('train') at size 32
        [
            T.RandomResizedCrop(size=32, scale=(0.5, 1), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    image = Image.fromarray(torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8).numpy())
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(a, reference(image))
    torch.manual_seed(0)
    assert not torch.equal(ours(image), ours(image))  # it does augment


def test_resume_after_interrupt_gives_the_same_weights(ballad_data, tmp_path):
    ds = load_dataset("fmnist-lt")
    cfg = FinetuneConfig(epochs=2, batch_size=128, lr=0.05, workers=0)
    finetune(ds, load_model("ballad-micro"), tmp_path / "a", cfg, torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        finetune(ds, load_model("ballad-micro"), tmp_path / "b", cfg, torch.device("cpu"), progress=StopAfterEpoch(1))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    finetune(ds, load_model("ballad-micro"), tmp_path / "b", cfg, torch.device("cpu"), resume=True)
    a = load_file(str(tmp_path / "a" / "model-last" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model-last" / "open_clip_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    start = load_file(str(tmp_path / "a" / "model-last" / "open_clip_model.safetensors"))
    assert any((start[k] - load_model("ballad-micro").model.state_dict()[k]).abs().max() > 1e-4 for k in start)


def test_max_steps_then_resume_ends_with_the_uninterrupted_weights(ballad_data, tmp_path):
    """Catches a stop by `max_steps` inside an epoch that checkpoints the next epoch (the resume skips the rest of
    the stopped epoch), a resume that restarts the epoch or replays a batch, a schedule that `max_steps` shortens
    (the stopped run's steps at other rates) and dropout draws that differ after a resume."""
    import dataclasses

    ds = load_dataset("fmnist-lt")
    cpu = torch.device("cpu")
    # 1236 // 128 = 9 steps an epoch; per-step cosine, so every step has its own rate
    cfg = FinetuneConfig(epochs=2, batch_size=128, lr=0.05, workers=0, schedule="step")

    def micro_with_dropout():
        """ballad-micro with dropout on the image features while training: the steps draw from torch's generator."""
        loaded = load_model(MODEL)
        loaded.model.visual.register_forward_hook(
            lambda module, args, out: torch.nn.functional.dropout(out, 0.3, training=torch.is_grad_enabled())
        )
        return loaded

    whole = finetune(ds, micro_with_dropout(), tmp_path / "a", cfg, cpu)
    first = finetune(ds, micro_with_dropout(), tmp_path / "b", dataclasses.replace(cfg, max_steps=4), cpu)
    assert first["steps"] == 4 and first["stopped"]["epoch"] == 1 and first["stopped"]["batch"] == 4
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"], state["best_epoch"]) == (0, 4, 4, -1)
    assert first["best_epoch"] == 1  # no epoch finished: model/ holds the weights at the stop, and says so
    second = finetune(
        ds, micro_with_dropout(), tmp_path / "b", dataclasses.replace(cfg, max_steps=13), cpu, resume=True
    )
    assert second["steps"] == 13 and second["stopped"]["epoch"] == 2 and second["stopped"]["batch"] == 4
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["best_epoch"] == 1  # epoch 1 finished in between
    last = finetune(ds, micro_with_dropout(), tmp_path / "b", cfg, cpu, resume=True)
    assert last["steps"] == whole["steps"] == 18 and last["stopped"] is None
    assert last["best_epoch"] == whole["best_epoch"]
    for folder in ("model-last", "model"):
        a = load_file(str(tmp_path / "a" / folder / "open_clip_model.safetensors"))
        b = load_file(str(tmp_path / "b" / folder / "open_clip_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), folder  # bitwise: the same steps in the same order
    start = load_model(MODEL).model.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)


def test_crafted_pickle_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(BalladError, match="refusing to load"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process(ballad_data, tmp_path):
    env = {**os.environ, "BALLAD_DATA": str(ballad_data), "OMP_NUM_THREADS": "1"}
    common = [
        "finetune",
        "--data",
        "fmnist-lt",
        "--model",
        "ballad-micro",
        "--max-steps",
        "3",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--schedule",
        "step",  # the official per-epoch cosine runs a single epoch at lr 0
    ]
    one = run_ballad([*common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_ballad([*common, "--out", str(tmp_path / "two")], env, ranks=2, port=29573)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model-last" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model-last" / "open_clip_model.safetensors"))
    start = load_model("ballad-micro").model.state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # the steps moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5  # fp32 all-reduce order


def test_a_diverged_phase_a_stops_with_one_line_and_fp16_refuses_adamw(ballad_data, tmp_path, monkeypatch):
    """Catches a phase A that trains on after its loss turned NaN (every later step and the saved model garbage),
    and `--precision fp16-official` with AdamW, whose eps is 0 in float16."""
    from ballad_cache.options import OptionError
    from ballad_cache.pipelines import finetune as finetune_module

    with pytest.raises(OptionError, match="eps"):
        FinetuneConfig(precision="fp16-official", optimizer="adamw")
    original = finetune_module.phase_a_loss
    monkeypatch.setattr(finetune_module, "phase_a_loss", lambda *a: original(*a) * float("nan"))
    cfg = FinetuneConfig(epochs=2, batch_size=128, lr=0.05, workers=0, log_every=2)
    with pytest.raises(BalladError, match="diverged: the loss is nan at step 2 ") as info:
        finetune(load_dataset("fmnist-lt"), load_model(MODEL), tmp_path, cfg, torch.device("cpu"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model").exists()
