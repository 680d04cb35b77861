"""Phase A's tuning methods: which parameters train and what is injected, one registered object each.

A method attaches to one tower of an open_clip model (`anatomy` says what the tower is made of): it marks existing
parameters trainable (`full`, `bitfit`) or adds modules under `model.ballad_tuner` and parametrizations or hooks
that apply them. Placement, sizes and initialisation follow LIFT (shijxcs/LIFT `models/peft_vit.py`,
`models/peft_modules.py`); each method names its lines. Importing this module does not import torch, so `ballad
--help` lists the methods without it.

    class Mine(TuningMethod):
        name, folds = "mine", True
        def attach(self, model, tower, options, tuner): ...
    register_method(Mine())
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from torch import nn

TUNER = "ballad_tuner"  # the attribute of the model that holds a method's added modules


@dataclass(frozen=True)
class TuningOptions:
    """The sizes a method reads: LoRA rank and alpha, AdaptFormer bottleneck (0: LIFT's rule), prompt length and
    depth, and the number of classes LIFT's rule sizes by."""

    num_classes: int
    rank: int = 0
    alpha: float = 1.0
    bottleneck: int = 0
    vpt_length: int = 10
    vpt_deep: bool = True


class TuningMethod:
    """One way of choosing what trains in a tower.

    `folds`: whether the trained model is plain weights again once merged (then `finetune` saves a plain open_clip
    folder); otherwise the folder keeps the method's tensors and a reference to the base weights. `convolutional`:
    whether it applies to a tower without transformer blocks. `reads`: the `FinetuneConfig` fields it reads.
    """

    name: str = ""
    help: str = ""
    folds: bool = True
    convolutional: bool = True
    reads: tuple[str, ...] = ()

    def refusal(self, model: nn.Module, tower: str) -> str | None:
        """Why this method cannot apply to `tower` of `model`, or None."""
        from ..anatomy import tower_kind

        if not self.convolutional and tower_kind(model, tower) == "convolutional":
            return "it needs transformer blocks"
        return None

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        """Make `tower` trainable the method's way: set `requires_grad` on existing parameters, or add modules to
        `tuner` (keys prefixed with the tower) and register the parametrizations or hooks that use them."""
        raise NotImplementedError


METHODS: Registry[TuningMethod] = Registry("tuning method")


def register_method(method: TuningMethod, replace: bool = False) -> TuningMethod:
    """Register a tuning method under `method.name`: `ballad finetune --method NAME` then uses it."""
    return METHODS.register(method.name, method, help=method.help, replace=replace)


def _refuse_wider(size: int, width: int, field: str, tower: str) -> None:
    """A bottleneck or rank wider than the blocks it sits beside adds parameters without adding capacity.

    Raises:
        BalladError: one line naming the option and the largest value that makes sense.
    """
    from ..errors import BalladError, setting

    if size > width:
        raise BalladError(
            f"{setting(field, size)} exceeds the {tower} tower's block width {width}; use at most "
            f"{setting(field, width)} (0: LIFT's rule)"
        )


def _parametrize(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(module, name, parametrization)


class Full(TuningMethod):
    """Every parameter of the tower trains (BALLAD's phase A)."""

    name, help = "full", "every parameter of the tuned towers (BALLAD's phase A; the default)"

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from ..anatomy import tower_parameters

        for param in tower_parameters(model, tower).values():
            param.requires_grad_(True)


class BitFit(TuningMethod):
    """The biases train: a ViT's block biases (LIFT `bias_tuning`, `models/peft_vit.py` lines 112-116); a
    convolutional tower's every bias (its BatchNorm shifts)."""

    name, help = "bitfit", "biases only (LIFT bias_tuning); folds into the weights"

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from ..anatomy import blocks, tower_module

        found = blocks(model, tower)
        owners = [b.module for b in found] if found else [tower_module(model, tower)]
        for owner in owners:
            for name, param in owner.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)


class SSFMethod(TuningMethod):
    """Scale and shift after the attention in- and out-projections, both MLP linears and both norms of every block
    (LIFT `ssf_attn`, `ssf_mlp`, `ssf_ln`: `models/peft_vit.py` lines 185-219, applied at 368-369, 381-384,
    403-404, 415-417, 429-430, 444-445); in a convolutional tower, after every BatchNorm. Folds: a forward hook on
    each linear whose forward runs (merged on save), a parametrization of the stacked q/k/v in-projection, the
    attention's out-projection (which the attention reads without calling it) and the norms."""

    name, help = "ssf", "scale and shift after every block linear and norm (LIFT ssf_*); folds"

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from torch import nn

        from ..anatomy import Site, affine_norms, blocks
        from .modules import SSF, SSFBias, SSFWeight

        sites: list[Site] = []
        for block in blocks(model, tower):
            attn_in = [block.attn_in] if block.attn_in else [block.query, block.key, block.value]
            sites += [*attn_in, block.attn_out, block.mlp_in, block.mlp_out, *block.norms]
        if not sites:
            sites = [Site(norm) for norm in affine_norms(model, tower)]
        names = {id(m): n for n, m in model.named_modules()}
        for i, site in enumerate(sites):
            bias = getattr(site.module, site.bias, None) if site.bias else None
            # a linear's output side saves the backward its weight gradient; a norm's scale is an elementwise
            # parametrization (cheap), and a timm norm may end in an activation a hook would come after
            hooked = site.called and isinstance(site.module, nn.Linear) and site.rows is None and bias is not None
            ssf = SSF(site.output, names[id(site.module)] if hooked else "")
            tuner[f"{tower}_ssf_{i}"] = ssf
            if hooked:  # output side: no weight gradient in the backward; folded on save
                site.module.register_forward_hook(lambda module, args, y, ssf=ssf: ssf(y))
                continue
            _parametrize(site.module, site.weight, SSFWeight(ssf))
            if bias is not None and site.bias:
                _parametrize(site.module, site.bias, SSFBias(ssf))


class LoRAMethod(TuningMethod):
    """A rank-r update of q and v in every block (LIFT `lora`: `models/peft_vit.py` lines 161-171, applied at
    377-379), rank by LIFT's rule unless `--lora-rank`; in a convolutional tower, of every dense convolution's weight
    (out × in·kh·kw). Folds."""

    name, help = "lora", "rank-r updates of q and v (LIFT lora; dense convs in a CNN); folds"
    reads = ("lora_rank", "lora_alpha")

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from ..anatomy import blocks, convolutions
        from .modules import LoRA, LoRAWeight, lift_bottleneck

        found = blocks(model, tower)
        if found:
            rank = options.rank or lift_bottleneck(options.num_classes, len(found))
            _refuse_wider(rank, found[0].width, "lora_rank", tower)
            for i, block in enumerate(found):
                parts: dict[int, tuple[Any, list[tuple[slice | None, LoRA]]]] = {}
                for role, site in (("q", block.query), ("v", block.value)):
                    lora = LoRA(site.input, site.output, rank, options.alpha)
                    tuner[f"{tower}_{i}_lora_{role}"] = lora
                    parts.setdefault(id(site.module), (site, []))[1].append((site.rows, lora))
                for site, loras in parts.values():
                    _parametrize(site.module, site.weight, LoRAWeight(loras))
            return
        convs = convolutions(model, tower)
        rank = options.rank or lift_bottleneck(options.num_classes, max(len(convs), 1))
        for i, conv in enumerate(convs):
            fan_in = conv.weight[0].numel()
            lora = LoRA(fan_in, conv.out_channels, rank, options.alpha)
            tuner[f"{tower}_conv{i}_lora"] = lora
            _parametrize(conv, "weight", LoRAWeight([(None, lora)]))


class AdaptFormerMethod(TuningMethod):
    """A bottleneck branch beside every block's MLP, reading the FFN's residual input (LIFT `adaptformer`:
    `models/peft_vit.py` lines 152-159, applied at 450-451; module `peft_modules.py` lines 54-78), bottleneck by
    LIFT's rule 2^⌊log2(C/2L)⌋ unless `--bottleneck`. Does not fold."""

    name, help = "adaptformer", "a bottleneck beside each MLP (LIFT's method); kept as tuner tensors"
    folds, convolutional = False, False
    reads = ("bottleneck",)

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from ..anatomy import blocks
        from .modules import AdaptFormer, lift_bottleneck

        found = blocks(model, tower)
        size = options.bottleneck or lift_bottleneck(options.num_classes, len(found))
        _refuse_wider(size, found[0].width, "bottleneck", tower)
        for i, block in enumerate(found):
            branch = AdaptFormer(block.width, size)
            tuner[f"{tower}_{i}_adaptformer"] = branch
            block.add_parallel_ffn(branch)


class VPTMethod(TuningMethod):
    """Learnable tokens appended before every block (deep) or the first (shallow) of a ViT image tower (LIFT
    `vpt_deep` / `vpt_shallow`: `models/peft_vit.py` lines 129-139, applied at 317-318), 10 by default (lines
    90-92). The prompts are cut off after the last block. Does not fold."""

    name, help = "vpt", "learnable prompt tokens before each ViT block (deep; --vpt-shallow: first only)"
    folds, convolutional = False, False
    reads = ("vpt_length", "vpt_shallow")

    def refusal(self, model: nn.Module, tower: str) -> str | None:
        from ..anatomy import vit_layout

        if tower != "image" or vit_layout(model) is None:
            return "visual prompts need a ViT image tower"
        return None

    def attach(self, model: nn.Module, tower: str, options: TuningOptions, tuner: nn.ModuleDict) -> None:
        from ..anatomy import vit_layout
        from .modules import VisualPrompts

        layout = vit_layout(model)
        assert layout is not None  # refusal() checked it
        seq_len, batch_first = layout.seq_len, layout.batch_first
        resblocks = list(layout.transformer.resblocks)
        for i, block in enumerate(resblocks if options.vpt_deep else resblocks[:1]):
            prompts = VisualPrompts(options.vpt_length, layout.width, layout.patch_size, seq_len)
            tuner[f"{tower}_{i}_vpt"] = prompts

            def add(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], prompts: Any = prompts) -> Any:
                return (prompts(args[0], batch_first), *args[1:]), kwargs

            block.register_forward_pre_hook(add, with_kwargs=True)

        def strip(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            return output[:, :seq_len]  # the transformer returns N×L×D

        layout.transformer.register_forward_hook(strip)


for _method in (Full(), BitFit(), SSFMethod(), LoRAMethod(), AdaptFormerMethod(), VPTMethod()):
    register_method(_method)


def applicable(model: nn.Module, tower: str) -> Iterator[str]:
    """The registered methods that apply to `tower` of `model`."""
    return (name for name in METHODS if METHODS.get(name).refusal(model, tower) is None)
