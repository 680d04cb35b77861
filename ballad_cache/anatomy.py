"""What a CLIP tower is made of: its towers' parameters, transformer blocks (attention and MLP linears, norms, the
FFN's residual input), its ViT token layout, its convolutions, its last projection, and which tensors the official
float16 rule narrows.

One module owns this knowledge; the tuning methods (`ballad_cache.tuning`), the fp16 rule
(`convert_weights_official`) and `export`'s adapter folding read a tower through it, so supporting a new tower
layout is a change here alone. Known layouts: open_clip's `ResidualAttentionBlock` (ViT image towers and CLIP's
text transformer: q, k and v stacked in `nn.MultiheadAttention.in_proj_weight`), Hugging Face BERT layers (the
MiniLM text tower of `ballad-tiny` / `ballad-lite`), and convolutional towers (timm trunks through open_clip's
`TimmModel`, which have no blocks of that kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# an open_clip model or one of its submodules: typed Any because attribute access through nn.Module.__getattr__ is
# invisible to type checkers (as `models.clip.ClipModel`)
Layer = Any

TOWERS = ("image", "text")
_SCALARS = ("logit_scale", "logit_bias")  # the CLIP model's own parameters, in neither tower


def tower_of(name: str) -> str | None:
    """The tower a parameter of an open_clip CLIP / CustomTextCLIP belongs to (`image`, `text`), or None for the
    model's logit scale and bias."""
    if name in _SCALARS:
        return None
    return "image" if name.startswith("visual.") else "text"


def tower_parameters(model: Layer, tower: str) -> dict[str, nn.Parameter]:
    """The named parameters of one tower (`image`: `visual.*`; `text`: everything else but the logit scale)."""
    return {n: p for n, p in model.named_parameters() if tower_of(n) == tower}


def tower_module(model: Layer, tower: str) -> Layer:
    """The module holding a tower's blocks: `model.visual`, `model.text` (CustomTextCLIP) or the CLIP model itself
    (whose text transformer, embeddings and projection are its own attributes)."""
    if tower == "image":
        return model.visual
    return getattr(model, "text", model)


@dataclass(frozen=True)
class Site:
    """One affine map inside a block: `module.<weight>` / `module.<bias>`, optionally a row range of a stacked
    weight (q, k or v of `in_proj_weight`). `output` is the width of the rows this site covers. `called`: whether the
    module's own forward runs (False for `nn.MultiheadAttention.out_proj`, whose weight the attention reads
    directly: a forward hook on it never fires)."""

    module: Layer
    weight: str = "weight"
    bias: str | None = "bias"
    rows: slice | None = None
    called: bool = True

    @property
    def output(self) -> int:
        """Rows of the weight this site covers."""
        w = getattr(self.module, self.weight)
        return (self.rows.stop - self.rows.start) if self.rows is not None else int(w.shape[0])

    @property
    def input(self) -> int:
        """Columns of the weight (the input width)."""
        return int(getattr(self.module, self.weight).shape[1])


@dataclass
class Block:
    """A transformer block as the tuning methods see it.

    `query`, `key`, `value`: the attention's input projections (rows of one stacked weight in open_clip);
    `attn_in`: the stacked q/k/v projection as one site where there is one (open_clip), else None;
    `attn_out`, `mlp_in`, `mlp_out`: the attention output and the two MLP linears; `norms`: the block's norms in order;
    `add_parallel_ffn(fn)`: hooks that add `fn(x)` to the FFN branch's output, `x` being the FFN's residual input
    (LIFT's AdaptFormer placement, shijxcs/LIFT `models/peft_vit.py` lines 413 and 450-451).
    """

    module: Layer
    width: int
    query: Site
    key: Site
    value: Site
    attn_in: Site | None
    attn_out: Site
    mlp_in: Site
    mlp_out: Site
    norms: list[Site]
    add_parallel_ffn: Callable[[Callable[[torch.Tensor], torch.Tensor]], list[Any]] = field(repr=False)


def _open_clip_block(block: Layer) -> Block:
    attn = block.attn
    width = int(attn.embed_dim)

    def add_parallel_ffn(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        # x + ls_2(mlp(ln_2(x))): the FFN's residual input is ln_2's input; its branch output is mlp's output
        stash: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
            stash["x"] = args[0]

        def add(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + fn(stash.pop("x"))

        return [block.ln_2.register_forward_pre_hook(keep), block.mlp.register_forward_hook(add)]

    def rows(i: int) -> Site:
        return Site(attn, "in_proj_weight", "in_proj_bias", slice(i * width, (i + 1) * width))

    return Block(
        module=block,
        width=width,
        query=rows(0),
        key=rows(1),
        value=rows(2),
        attn_in=Site(attn, "in_proj_weight", "in_proj_bias"),
        attn_out=Site(attn.out_proj, called=not isinstance(attn, nn.MultiheadAttention)),
        mlp_in=Site(block.mlp.c_fc),
        mlp_out=Site(block.mlp.c_proj),
        norms=[Site(block.ln_1), Site(block.ln_2)],
        add_parallel_ffn=add_parallel_ffn,
    )


def _bert_block(layer: Layer) -> Block:
    width = int(layer.attention.self.query.in_features)

    def add_parallel_ffn(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        # BertOutput(h, x) = LayerNorm(dropout(dense(h)) + x): adding fn(x) to x adds it to the branch's output
        def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if len(args) >= 2:
                hidden, x, *rest = args
                return (hidden, x + fn(x), *rest), kwargs
            kwargs = dict(kwargs)
            kwargs["input_tensor"] = kwargs["input_tensor"] + fn(kwargs["input_tensor"])
            return args, kwargs

        return [layer.output.register_forward_pre_hook(add, with_kwargs=True)]

    return Block(
        module=layer,
        width=width,
        query=Site(layer.attention.self.query),
        key=Site(layer.attention.self.key),
        value=Site(layer.attention.self.value),
        attn_in=None,
        attn_out=Site(layer.attention.output.dense),
        mlp_in=Site(layer.intermediate.dense),
        mlp_out=Site(layer.output.dense),
        norms=[Site(layer.attention.output.LayerNorm), Site(layer.output.LayerNorm)],
        add_parallel_ffn=add_parallel_ffn,
    )


def blocks(model: Layer, tower: str) -> list[Block]:
    """The transformer blocks of a tower, first to last; empty for a convolutional tower."""
    from open_clip.transformer import ResidualAttentionBlock

    module = tower_module(model, tower)
    if tower == "text" and hasattr(module, "transformer") and hasattr(module.transformer, "encoder"):
        return [_bert_block(layer) for layer in module.transformer.encoder.layer]  # Hugging Face BERT
    if tower == "image" and not hasattr(module, "transformer"):
        return []  # a timm trunk or a ModifiedResNet
    transformer = module.transformer
    found = [b for b in getattr(transformer, "resblocks", []) if isinstance(b, ResidualAttentionBlock)]
    return [_open_clip_block(b) for b in found]


def tower_kind(model: Layer, tower: str) -> str:
    """`transformer` when the tower is built of blocks `blocks` knows, else `convolutional`."""
    return "transformer" if blocks(model, tower) else "convolutional"


def tower_name(model: Layer, tower: str) -> str:
    """A tower's architecture in words, for messages: `VisionTransformer`, `EfficientNet (timm)`, `BertModel`, ..."""
    module = tower_module(model, tower)
    trunk = getattr(module, "trunk", None)
    if trunk is not None:
        return f"{type(trunk).__name__} (timm)"
    if tower == "text" and hasattr(module, "transformer") and hasattr(module.transformer, "encoder"):
        return type(module.transformer).__name__
    return type(module).__name__ if tower == "image" else "Transformer"


@dataclass(frozen=True)
class TokenLayout:
    """A ViT image tower's token sequence: the transformer the blocks sit in, the tokens before any prompt
    (class token + patches), the width and the patch size."""

    transformer: Layer
    seq_len: int
    width: int
    patch_size: tuple[int, int]
    batch_first: bool


def vit_layout(model: Layer) -> TokenLayout | None:
    """The token layout of an open_clip ViT image tower, or None for any other tower."""
    visual = model.visual
    if not (hasattr(visual, "transformer") and hasattr(visual, "conv1") and hasattr(visual, "positional_embedding")):
        return None
    pos = visual.positional_embedding
    return TokenLayout(
        transformer=visual.transformer,
        seq_len=int(pos.shape[0]),
        width=int(pos.shape[1]),
        patch_size=tuple(visual.conv1.kernel_size),
        batch_first=bool(getattr(visual.transformer, "batch_first", False)),
    )


def convolutions(model: Layer, tower: str) -> list[nn.Conv2d]:
    """A tower's dense convolutions (groups == 1; depthwise ones left out), in module order."""
    return [m for m in tower_module(model, tower).modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def affine_norms(model: Layer, tower: str) -> list[nn.Module]:
    """A tower's BatchNorm and LayerNorm layers with a learnable affine weight and bias, in module order."""
    kinds = (nn.BatchNorm2d, nn.LayerNorm)
    return [
        m
        for m in tower_module(model, tower).modules()
        if isinstance(m, kinds) and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None
    ]


def last_projection(model: Layer) -> tuple[str, Any]:
    """The image tower's last linear map, where `export` folds an adapter: (`matrix`, the ViT `proj` parameter,
    applied as `x @ proj`), (`linear`, an `nn.Linear` applied as `W x + b`: ModifiedResNet's attention-pool output
    projection, a timm tower's projection, its MLP's last layer, or the trunk's classifier), or (`none`, None) for a
    timm tower with no projection (`timm_proj: none`), or (`unsupported`, reason).
    """
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):
        return "matrix", proj
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None and isinstance(getattr(attnpool, "c_proj", None), nn.Linear):
        return "linear", attnpool.c_proj
    head = getattr(visual, "head", None)
    if head is not None and hasattr(visual, "trunk"):  # open_clip TimmModel
        if isinstance(getattr(head, "proj", None), nn.Linear):
            return "linear", head.proj
        if getattr(head, "mlp", None) is not None:
            return "linear", head.mlp.fc2
        if "pool" in dict(head.named_children()):
            return "unsupported", "a timm tower with attention pooling"
        classifier = visual.trunk.get_classifier()
        if isinstance(classifier, nn.Linear):
            return "linear", classifier
        return "none", None
    return "unsupported", f"{type(visual).__name__}: its output does not end in a known linear map"


# openai/CLIP `clip/model.py` `convert_weights`: the attention tensors it narrows besides Conv/Linear weights
_HALF_ATTENTION = (
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
)
_HALF_PROJECTIONS = ("text_projection", "proj")


def official_half_tensors(model: Layer) -> Iterator[torch.Tensor]:
    """The tensors openai/CLIP's `convert_weights` stores in float16: every Conv1d, Conv2d and Linear weight and
    bias, `nn.MultiheadAttention`'s in/q/k/v projection weights, in-projection bias and bias_k/bias_v, and any
    parameter named `text_projection` or `proj`. Everything else (norms, embeddings, the logit scale) stays."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            yield from (t for t in (module.weight, module.bias) if t is not None)
        if isinstance(module, nn.MultiheadAttention):
            yield from (t for t in (getattr(module, n, None) for n in _HALF_ATTENTION) if t is not None)
        for name in _HALF_PROJECTIONS:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                yield param
