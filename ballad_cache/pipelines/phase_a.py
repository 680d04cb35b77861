"""Phase A's model and state: preparing the model (which parameters train, what is injected, which towers run without
gradients) and its optimizer groups, the training state (checkpoint, resume and its check), and saving what it
trained.

    net = prepare(loaded, dataset, config, device)   # tuning method attached, classifier built
    image, classes = net(images)                      # normalised image features, class embeddings
    loss = PHASE_A_LOSSES.get(config.loss)(image, classes, labels, net.scale, net.adjust)
    net.save(folder)                                  # plain open_clip folder, or base reference + tuner tensors

`finetune.py` runs the epochs around it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path, ensure_free_space
from ..errors import BalladError, setting
from ..heads.terms import LOGIT_SCALE
from ..inputs.datasets import LTDataset, load_templates
from ..models.clip import ClassHead, LoadedModel, PromptBank, convert_weights_official
from ..models.encoder import autocast
from ..models.tuned import base_reference, save_phase_a_model, weights_sha256
from ..tuning import METHODS, TuningOptions
from ..tuning.methods import TUNER
from ..tuning.tuned import tune
from .configs import FINETUNE_PRECISIONS, FinetuneConfig

# fields a resumed run may change: they steer the run, not what it computes
RUN_ONLY_FIELDS = ("workers", "log_every", "checkpoint_every", "max_steps", "skip_bad")


def tuning_options(config: FinetuneConfig, num_classes: int) -> TuningOptions:
    """The sizes `config` gives the tuning method."""
    return TuningOptions(
        num_classes=num_classes,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        bottleneck=config.bottleneck,
        vpt_length=config.vpt_length,
        vpt_deep=not config.vpt_shallow,
    )


class PhaseANet(nn.Module):
    """The model phase A trains, with its classifier: `forward(images)` gives (normalised image features, class
    embeddings); the loss scores `scale · image · classesᵀ` (+ `adjust`, the logit adjustment of `--loss la`).

    Class embeddings: `prompts` re-encodes the class prompts through the text tower at each step while it trains
    (BALLAD), and encodes them once under no-grad when it is frozen; `cosine` is a learned C×d head initialised
    from the prompt embeddings (LIFT `trainer.py` lines 313-353), normalised at each use.
    """

    model: Any  # an open_clip model (attribute access through nn.Module is invisible to type checkers)
    text: torch.Tensor | None
    adjust: torch.Tensor | None

    def __init__(
        self,
        model: nn.Module,
        prompts: PromptBank,
        config: FinetuneConfig,
        towers: list[str],
        text: torch.Tensor | None,
        adjust: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.prompts = prompts
        self.kind = config.classifier
        self.text_trains = "text" in towers
        self.scale = config.cosine_scale if config.classifier == "cosine" else LOGIT_SCALE
        self.head: nn.Parameter | None = None
        self.register_buffer("text", text, persistent=False)
        self.register_buffer("adjust", adjust, persistent=False)
        if config.classifier == "cosine":
            assert text is not None
            self.head = nn.Parameter(text.detach().clone())

    def classes(self) -> torch.Tensor:
        """The class embeddings the loss and the val scores use (C×D, L2-normalised)."""
        if self.head is not None:
            return F.normalize(self.head, dim=-1)
        if self.text_trains:
            return self.prompts.encode(self.model)
        return cast(torch.Tensor, self.text)  # set by __init__ whenever the text tower is frozen

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image features and the class embeddings."""
        image = F.normalize(self.model.encode_image(images), dim=-1)
        return image, self.classes()

    def class_head(self, classnames: list[str]) -> ClassHead | None:
        """The cosine head to save beside the model, or None for `prompts`."""
        if self.head is None:
            return None
        return ClassHead(F.normalize(self.head.detach().float(), dim=-1).cpu(), list(classnames), float(self.scale))


def prepare(
    loaded: LoadedModel, dataset: LTDataset, config: FinetuneConfig, device: torch.device
) -> tuple[PhaseANet, list[dict[str, Any]], dict[str, Any] | None]:
    """The phase-A net on `device`, its optimizer groups (the method's parameters, then the head's) and, for a method
    that does not fold, the base reference its saved folders record.

    Raises:
        BalladError: the method does not apply to a tuned tower (one line naming the tower and the methods that do).
    """
    if getattr(loaded.model, TUNER, None) is not None:
        raise BalladError(
            f"{loaded.name} is a tuned-model folder (base weights + tuner): phase A starts from plain weights; start "
            "from its base model"
        )
    model = loaded.model.to(device).train(config.train_mode)
    towers = config.towers
    base = base_reference(loaded, weights_sha256(model)) if not METHODS.get(config.method).folds else None
    if config.precision == "fp16-official":  # before DDP and the optimizer, which see the float16 tensors
        convert_weights_official(model)
    tuned = tune(model, config.method, towers, tuning_options(config, len(dataset.classnames)))
    templates = load_templates(config.templates) if config.templates else dataset.templates
    prompts = PromptBank(loaded, dataset.classnames, templates)
    text = None
    if config.classifier == "cosine" or "text" not in towers:
        model.eval()  # the class embeddings as evaluation sees them (no dropout baked into the head's start)
        with torch.no_grad(), autocast(device, config.precision, FINETUNE_PRECISIONS):
            text = prompts.encode(model)
        model.train(config.train_mode)
        text = text.to(torch.promote_types(text.dtype, torch.float32))
    adjust = None
    if config.loss == "la":
        counts = torch.as_tensor(dataset.class_counts("train"), dtype=torch.float64)
        if (counts == 0).any():
            raise BalladError(
                f"{setting('loss', 'la')} needs every class in the train split, but "
                f"{int((counts == 0).sum())} class(es) have no image; use {setting('loss', 'ce')}"
            )
        adjust = (config.la_tau * torch.log(counts / counts.sum())).float().to(device)
    net = PhaseANet(model, prompts, config, towers, text, adjust).to(device)
    groups: list[dict[str, Any]] = [{"params": tuned}]
    if net.head is not None:
        head_lr = config.lr if config.head_lr is None else config.head_lr
        head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
        groups.append({"params": [net.head], "lr": head_lr, "weight_decay": head_wd, "base_lr": head_lr})
    return net, groups, base


def trainable_count(net: PhaseANet) -> dict[str, int]:
    """Parameters that train (method, head) and the image tower's size, for the run's summary."""
    method = sum(p.numel() for n, p in net.model.named_parameters() if p.requires_grad)
    image = sum(  # the tower's own weights: a parametrized weight counts as its original, not its tuner's tensors
        p.numel()
        for n, p in net.model.named_parameters()
        if n.startswith("visual.") and (".parametrizations." not in n or n.endswith(".original"))
    )
    return {"method": method, "head": net.head.numel() if net.head is not None else 0, "image_tower": image}


def save(
    net: PhaseANet,
    loaded: LoadedModel,
    folder: Path,
    config: FinetuneConfig,
    classnames: list[str],
    base: dict[str, Any] | None,
) -> Path:
    """Save the trained model to `folder` (see `models.tuned.save_phase_a_model`)."""
    options = tuning_options(config, len(classnames))
    head = net.class_head(classnames)
    return save_phase_a_model(loaded, net.model, folder, config.method, config.towers, options, base, head)


def refuse_changed_config(stored: dict[str, Any], config: FinetuneConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint written with other options, naming each field that differs; fields that only
    steer the run (`RUN_ONLY_FIELDS`) may change. A field the checkpoint predates counts at its default.

    Raises:
        BalladError: one line, e.g. "checkpoint.pt was written with --lr 0.01 (now --lr 0.1); ...".
    """
    now = asdict(config)
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    changed = []
    for name, value in now.items():
        if name in RUN_ONLY_FIELDS:
            continue
        before = stored.get(name, defaults.get(name))
        if isinstance(before, list):
            before = tuple(before)
        if before != (tuple(value) if isinstance(value, list) else value):
            changed.append(f"{setting(name, before)} (now {setting(name, value)})")
    if changed:
        raise BalladError(
            f"{checkpoint} was written with {', '.join(changed)}; resume with the same options, or start again "
            f"with {setting('overwrite', True)}"
        )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; a full disk is a one-line error and the previous checkpoint stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(path, state_bytes(state))
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports a failed write (e.g. disk filled meanwhile) this way
            first = str(exc).strip().splitlines()[0][:160]
            raise BalladError(
                f"cannot write {path}: {first}; check free space, then rerun with {setting('resume', True)}"
            ) from None


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a phase-A checkpoint with `weights_only=True` (tensors and plain containers only).

    Raises:
        BalladError: the file is missing, truncated, or holds anything but weights (e.g. a crafted pickle).
    """
    if not path.exists():
        raise BalladError(f"{path} does not exist; nothing to resume (drop {setting('resume')} to start fresh)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise BalladError(
            f"refusing to load {path}: not a plain weights checkpoint ({first}); delete it and start without "
            f"{setting('resume')}"
        ) from None


@dataclass
class TrainState:
    """Where phase A stands, as `checkpoint.pt` holds it with the model (tuner and parametrizations included), the
    cosine head, the optimizer, the options and the generators: the epoch and batch to continue at, the optimizer
    steps taken, the best val top-1 so far and its epoch, and (restored) the global generator at the checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_epoch: int = -1
    rng: torch.Tensor | None = None

    def save(
        self, path: Path, net: PhaseANet, opt: torch.optim.Optimizer, config: FinetuneConfig, device: torch.device
    ) -> None:
        """Write the checkpoint atomically (see `save_checkpoint`)."""
        save_checkpoint(
            path,
            {
                "model": net.model.state_dict(),
                **({"head": net.head.detach()} if net.head is not None else {}),
                "optimizer": opt.state_dict(),
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "step": self.step,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "config": asdict(config),
                "rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            },
        )

    @classmethod
    def restore(
        cls, path: Path, net: PhaseANet, opt: torch.optim.Optimizer, config: FinetuneConfig, device: torch.device
    ) -> TrainState:
        """Load a checkpoint into `net` and `opt` (prepared as the run that wrote it) and return where it stood.

        Raises:
            BalladError: an unreadable checkpoint, or one written with other options (`refuse_changed_config`).
        """
        state = load_checkpoint(path)
        refuse_changed_config(state.get("config", {}), config, path)
        net.model.load_state_dict(state["model"])
        if net.head is not None:
            net.head.data.copy_(state["head"])
        opt.load_state_dict(state["optimizer"])
        if device.type == "cuda" and "cuda_rng" in state:  # nothing draws from it between checkpoint and here
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        rng = state.get("rng")  # absent from checkpoints written before it was saved
        return cls(state["epoch"], state["batch_in_epoch"], state["step"], state["best"], state["best_epoch"], rng)
