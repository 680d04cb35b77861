"""Phase A with `--method adaptformer --classifier cosine --loss la --schedule epoch-end` against LIFT's loop, written
here from shijxcs/LIFT, not from `ballad` code:

- the tower's forward: `models/peft_vit.py` `Peft_ViT.forward` (lines 286-463), the AdaptFormer branch added beside
  the MLP from the FFN's residual input (lines 413 and 450-451);
- the branch: `models/peft_modules.py` lines 54-78 (`AdaptFormer`: x -> scale · up(relu(down(LN(x))))), its bottleneck
  by `models/peft_vit.py` lines 94-97 (2^⌊log2(C/2L)⌋);
- the head: `models/classifiers.py` lines 5-41 (`CosineClassifier`: 25 · norm(x) · norm(W)ᵀ, the scale from
  `utils/config.py` line 30), initialised from the prompts' text features (`trainer.py` lines 313-353);
- the loss: `utils/losses.py` lines 84-94 (`LogitAdjustedLoss`, tau 1) over the train split's class counts
  (`trainer.py` line 286, a float32 tensor);
- the optimizer and schedule: `trainer.py` lines 254-282 (SGD, momentum 0.9, weight decay 5e-4, groups tuner and
  head at one lr; `CosineAnnealingLR(T_max=epochs)`) stepped at each epoch's end (line 526).

One documented deviation is written into the reference as `ballad` has it: the feature the head scores is the projected
CLIP embedding (`encode_image`, ln_post(token 0) @ proj), where LIFT scores ln_post's output before the projection
(`peft_vit.py` lines 457-459) and projects the text features back through `proj.t()` to initialise the head
(`trainer.py` lines 349-351). The head here is therefore the normalised projected text embedding, as `ballad`'s.

`ballad`'s run records the batches it feeds the image tower, their labels, its loss per step and its tuner at the first
step; the reference takes that initial tuner (the draw is random) after checking LIFT's initialisation, and replays the
batches through its own forward (the base weights read from a copy of the starting state dict), its own AdaptFormer,
head, loss, optimizer and schedule. Compared: the loss of every step, the learning rate of every step, and the final
tuner tensors and head, in float64 (the model converted, which its tuner follows; the images cast on their way into
the image tower) within the training bound of `tests/rounding.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.models.clip import load_model
from ballad_cache.models.tuned import weights_sha256
from ballad_cache.pipelines import finetune as finetune_module
from ballad_cache.pipelines.finetune import FinetuneConfig, finetune
from tests.rounding import EPS32, training_bound

MODEL = "ballad-micro"  # open_clip's CLIP ViT: 2 blocks of width 64, 2 heads of 32, patch 8 on 32×32 images
HEADS = 2
EPOCHS, BATCH = 3, 32
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # LIFT utils/config.py lines 24-26
COSINE_SCALE = 25.0  # LIFT utils/config.py line 30
LAST_EPOCH_STEPS = 6  # `max_steps` stops the run this far into the last epoch (the whole run's schedule still holds)
TUNER_KEYS = ("ln.weight", "ln.bias", "down_proj.weight", "down_proj.bias", "up_proj.weight", "up_proj.bias", "scale")
# the longest sum of one step: the patch convolution's 3·8·8 products (the blocks' sums are 64 and 128 long)
TERMS = 3 * 8 * 8
ORIGINAL_LOSS = finetune_module.phase_a_loss

Tensors = dict[str, torch.Tensor]


class Recorder:
    """What `ballad`'s phase A trains on and computes: each step's images (cast to float64 on their way into the image
    tower), labels and loss, and at the first step its tuner tensors, features, class embeddings, scale and logit
    adjustment."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.images: list[torch.Tensor] = []
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[float] = []
        self.first: dict | None = None

    def image_hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        images = args[0].to(torch.float64)
        if torch.is_grad_enabled():  # a training step (validation runs under inference mode)
            self.images.append(images.detach().clone())
        return (images, *args[1:])

    def loss(self, image, classes, labels, kind, scale, adjust):  # wraps ballad's loss: records, then computes
        if self.first is None:
            tuner = self.model.ballad_tuner.state_dict()
            self.first = {
                "tuner": {k: v.detach().clone() for k, v in tuner.items()},
                "image": image.detach().clone(),
                "classes": classes.detach().clone(),
                "scale": scale,
                "adjust": adjust.detach().clone(),
            }
        self.steps.append((self.images.pop(), labels.detach().clone()))
        loss = ORIGINAL_LOSS(image, classes, labels, kind, scale, adjust)
        self.losses.append(loss.item())
        return loss


def random_norm_affines(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the image tower's LayerNorms a random affine map (weight ~ N(1, 0.5²), bias ~ N(0, 0.5²)), as a trained
    tower has. open_clip initialises them to the identity, and after an identity ln_2 the branch's own LayerNorm sees
    nearly the same input whether it reads ln_2's input or its output (LN(LN(x)) ≈ LN(x)): a branch reading the wrong
    one would move the loss by ~1e-9 only."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.visual.modules():
            if isinstance(module, torch.nn.LayerNorm):
                for param, mean in ((module.weight, 1.0), (module.bias, 0.0)):
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                    param.copy_(mean + 0.5 * noise)


def layer_norm(x: torch.Tensor, weights: Tensors, prefix: str) -> torch.Tensor:
    """LayerNorm over the last dim with `prefix`.weight / `prefix`.bias (eps 1e-5, open_clip's and LIFT's)."""
    return F.layer_norm(x, x.shape[-1:], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], 1e-5)


def adaptformer(x: torch.Tensor, tuner: Tensors, block: int) -> torch.Tensor:
    """LIFT `peft_modules.py` `AdaptFormer.forward`: scale · up(relu(down(LN(x))))."""
    p = f"image_{block}_adaptformer."
    h = layer_norm(x, tuner, p + "ln")
    h = F.relu(F.linear(h, tuner[p + "down_proj.weight"], tuner[p + "down_proj.bias"]))
    return F.linear(h, tuner[p + "up_proj.weight"], tuner[p + "up_proj.bias"]) * tuner[p + "scale"]


def attention(x: torch.Tensor, weights: Tensors, prefix: str) -> torch.Tensor:
    """Multi-head self-attention from the stacked in-projection, softmax(q kᵀ / √d) v written out (LIFT
    `peft_vit.py` lines 365-406, its comment's explicit form), then the out-projection. `x`: N×L×D."""
    n, length, width = x.shape
    qkv = F.linear(x, weights[f"{prefix}.in_proj_weight"], weights[f"{prefix}.in_proj_bias"])
    q, k, v = (t.reshape(n, length, HEADS, width // HEADS).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // HEADS), dim=-1)
    out = (scores @ v).transpose(1, 2).reshape(n, length, width)
    return F.linear(out, weights[f"{prefix}.out_proj.weight"], weights[f"{prefix}.out_proj.bias"])


def lift_features(base: Tensors, tuner: Tensors | None, images: torch.Tensor) -> torch.Tensor:
    """LIFT `Peft_ViT.forward` on open_clip's ViT weights (`visual.*` of `base`), the AdaptFormer branch per block
    (none when `tuner` is None), then, as `ballad` (the documented deviation), ln_post(token 0) @ proj."""
    patch = base["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, base["visual.conv1.weight"], stride=patch)  # N × width × grid × grid
    x = x.flatten(2).transpose(1, 2)  # N × grid² × width
    cls = base["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + base["visual.positional_embedding"]
    x = layer_norm(x, base, "visual.ln_pre")
    layers = len({k.split(".")[3] for k in base if k.startswith("visual.transformer.resblocks.")})
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        x = x + attention(layer_norm(x, base, p + "ln_1"), base, p + "attn")
        identity = x  # the FFN's residual input: what the AdaptFormer reads (LIFT line 413)
        h = F.linear(layer_norm(x, base, p + "ln_2"), base[p + "mlp.c_fc.weight"], base[p + "mlp.c_fc.bias"])
        x = F.linear(F.gelu(h), base[p + "mlp.c_proj.weight"], base[p + "mlp.c_proj.bias"])
        if tuner is not None:
            x = x + adaptformer(identity, tuner, i)  # LIFT lines 450-451
        x = x + identity
    return layer_norm(x[:, 0], base, "visual.ln_post") @ base["visual.proj"]


def prompt_embeddings(base: Tensors, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """The head's initial weight (C×D): per class the prompts' text embeddings (open_clip's `encode_text` at the model's
    full context), L2-normalised, averaged over the templates and normalised again (LIFT `init_head_text_feat`,
    the projected CLIP text embedding as `ballad` scores the projected image one)."""
    model = load_model(MODEL).model.double()
    model.load_state_dict(base)
    context = model.positional_embedding.shape[0]
    tokens = open_clip.tokenize([t.replace("{c}", c) for c in classnames for t in templates], context_length=context)
    with torch.no_grad():
        feats = F.normalize(model.encode_text(tokens), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def lift_phase_a(
    base: Tensors,
    initial: Tensors,
    head_init: torch.Tensor,
    prior: torch.Tensor,
    steps: list[tuple[torch.Tensor, torch.Tensor]],
    steps_per_epoch: int,
) -> tuple[list[float], list[float], Tensors, torch.Tensor]:
    """LIFT's training loop over the recorded batches: SGD(lr, momentum 0.9, weight decay 5e-4) on the groups [tuner,
    head], CosineAnnealingLR(T_max=epochs) stepped after each epoch, loss CE(25 · norm(f) · norm(W)ᵀ + log prior).
    Returns each step's loss and lr, and the final tuner tensors and head."""
    tuner = {k: v.clone().requires_grad_(True) for k, v in initial.items()}
    head = head_init.clone().requires_grad_(True)
    optimizer = torch.optim.SGD(
        [{"params": list(tuner.values())}, {"params": [head]}], lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    losses, lrs = [], []
    for epoch in range(EPOCHS):
        for images, labels in steps[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]:
            feats = lift_features(base, tuner, images)
            logits = F.linear(F.normalize(feats, dim=-1), F.normalize(head, dim=-1)) * COSINE_SCALE
            loss = F.cross_entropy(logits + prior.unsqueeze(0), labels)
            optimizer.zero_grad()
            loss.backward()
            lrs.append(optimizer.param_groups[0]["lr"])
            assert optimizer.param_groups[1]["lr"] == lrs[-1]
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
    return losses, lrs, {k: v.detach() for k, v in tuner.items()}, head.detach()


def relative_gap(ours: torch.Tensor, ref: torch.Tensor, start: torch.Tensor) -> float:
    """The largest difference of `ours` from `ref`, relative to how far `ref` moved from `start`."""
    moved = (ref - start).abs().max().item()
    assert moved > 0
    return (ours.double() - ref).abs().max().item() / moved


@pytest.fixture()
def one_attention_path() -> Iterator[None]:
    """torch's MultiheadAttention without its fused inference path, which it takes in eval mode whenever no input
    needs a gradient: in `ballad`'s step the first block (before any branch) would take it and the second not, so
    the tuned tower's step-0 features could not be compared bit for bit with the untuned tower's."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def test_phase_a_adaptformer_is_lifts_loop(
    ballad_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_attention_path: None
):
    """Catches, with `--method adaptformer --classifier cosine --loss la --schedule epoch-end`: the branch reading
    another tensor (ln_2's output, the block's input) or added elsewhere, another branch (no LayerNorm, GELU, no
    scale), another initialisation (up-projection or biases not zero, scale not 1, another bottleneck), the base tower
    trained, another head (scale, unnormalised, another initialisation) or loss (tau, prior of another split, no
    adjustment), another SGD update or lr for either group, another schedule (the BALLAD one stepped at each epoch's
    start, per-step cosine), and a saved folder that does not hold the trained tensors or does not name the base."""
    ds = load_dataset("fmnist-lt")
    loaded = load_model(MODEL)
    loaded.model.double()
    random_norm_affines(loaded.model)
    assert loaded.model.visual.transformer.resblocks[0].attn.num_heads == HEADS
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    recorder = Recorder(loaded.model)
    loaded.model.visual.register_forward_pre_hook(recorder.image_hook)
    monkeypatch.setattr(finetune_module, "phase_a_loss", recorder.loss)
    steps_per_epoch = len(ds.split("train")) // BATCH
    config = FinetuneConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        workers=0,
        method="adaptformer",
        classifier="cosine",
        loss="la",
        schedule="epoch-end",
        log_every=1,
        max_steps=(EPOCHS - 1) * steps_per_epoch + LAST_EPOCH_STEPS,
    )
    finetune(ds, loaded, tmp_path, config, torch.device("cpu"))
    steps = recorder.steps
    assert len(steps) == config.max_steps
    first = recorder.first
    assert first is not None

    # LIFT's initialisation: bottleneck 2^⌊log2(C/2L)⌋, up-projection and biases zero, scale 1, LayerNorm identity,
    # down-projection Kaiming-normal with a=√5 (std √(2/(1+5)) / √fan_in; 128 draws: a 6% standard error)
    layers, width, classes = 2, 64, len(ds.classnames)
    bottleneck = 2 ** max(0, int(math.log2(classes / (2 * layers))))
    initial = first["tuner"]
    assert set(initial) == {f"image_{i}_adaptformer.{k}" for i in range(layers) for k in TUNER_KEYS}
    assert {t.dtype for t in initial.values()} == {torch.float64}
    for i in range(layers):
        p = f"image_{i}_adaptformer."
        assert initial[p + "down_proj.weight"].shape == (bottleneck, width)
        for zero in ("up_proj.weight", "up_proj.bias", "down_proj.bias", "ln.bias"):
            assert not initial[p + zero].any(), zero
        assert torch.equal(initial[p + "scale"], torch.ones(1, dtype=torch.float64))
        assert torch.equal(initial[p + "ln.weight"], torch.ones(width, dtype=torch.float64))
        std = initial[p + "down_proj.weight"].std().item()
        assert std == pytest.approx(math.sqrt(2 / 6) / math.sqrt(width), rel=0.3)

    # step 0 is the base model: the tuned tower's features equal the untuned tower's, bit for bit
    plain = load_model(MODEL).model.double().eval()
    plain.load_state_dict(base)
    untuned = plain.encode_image(steps[0][0]).detach()
    assert torch.equal(first["image"], F.normalize(untuned, dim=-1))
    # and the forward written here is open_clip's (the branch zero at step 0), to float64 rounding
    with torch.no_grad():
        ours = lift_features(base, initial, steps[0][0])
    assert (ours - untuned).abs().max() <= training_bound(1, TERMS) * ours.abs().max()

    # the head starts at the normalised prompt embeddings, scored at scale 25
    head_init = prompt_embeddings(base, ds.classnames, ds.templates)
    assert (first["classes"] - head_init).abs().max() <= training_bound(1, TERMS)
    assert first["scale"] == COSINE_SCALE

    # LA's prior: tau 1 · log(train counts / N), held in float32 as LIFT holds it (trainer.py line 286); the reference
    # rounds the exact value once (LIFT's float32 division and log may be an ulp off that: its rounding, not its rule)
    counts = torch.as_tensor(np.bincount(ds.split("train").labels, minlength=classes), dtype=torch.float64)
    prior = torch.log(counts / counts.sum()).float()
    assert first["adjust"].dtype == torch.float32
    assert (first["adjust"] - prior).abs().max() <= EPS32 * prior.abs().max()

    losses, lrs, tuner, head = lift_phase_a(base, initial, head_init, prior.double(), steps, steps_per_epoch)
    bound = training_bound(len(steps), TERMS)
    gaps = [abs(a - b) / abs(b) for a, b in zip(recorder.losses, losses, strict=True)]
    assert max(gaps) <= bound, (max(gaps), bound)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx(lrs, rel=1e-12)

    # ballad's saved model: the trained tuner tensors (float64, as trained) beside a reference to the unchanged base
    last = tmp_path / "model-last"
    saved = load_file(str(last / "tuner.safetensors"))
    assert set(saved) == set(tuner)
    for name, tensor in tuner.items():
        assert saved[name].dtype == torch.float64, name
        assert relative_gap(saved[name], tensor, initial[name]) <= bound, name
    checkpoint = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == len(steps)
    assert relative_gap(checkpoint["head"], head, head_init) <= bound
    assert max((tensor - initial[name]).abs().max().item() for name, tensor in tuner.items()) > 1e-2  # training moved
    saved_head = load_file(str(last / "class_head.safetensors"))["weight"]  # normalised, float32
    assert (saved_head.double() - F.normalize(head, dim=-1)).abs().max() <= EPS32
    for name, tensor in base.items():  # the frozen tower and text tower, as they started
        assert torch.equal(checkpoint["model"][name], tensor), name
    meta = json.loads((last / "ballad_tuned.json").read_text())
    assert (meta["method"], meta["towers"], meta["base"]["name"]) == ("adaptformer", ["image"], MODEL)
    assert meta["base"]["weights_sha256"] == weights_sha256(plain)  # plain: the starting weights, untuned
