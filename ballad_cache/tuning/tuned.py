"""A tuning method attached to an open_clip model: what trains, the tensors it added, and the model's weights with
everything merged.

`tune` freezes the model, attaches the method to each tuned tower (its modules under `model.ballad_tuner`, its
parametrizations on the weights they change) and returns the trainable parameters. `plain_state_dict` is the model
as plain open_clip weights (parametrizations evaluated, tuner modules left out): what a folding method saves.
`tuner_state` / `load_tuner_state` are the method's own tensors: what a method that does not fold saves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..anatomy import tower_name
from ..errors import BalladError
from .methods import METHODS, TUNER, TuningOptions, applicable


def refuse_inapplicable(model: nn.Module, method: str, towers: Sequence[str]) -> None:
    """Raise when `method` cannot apply to one of `towers`, naming the tower and the methods that do apply.

    Raises:
        BalladError: one line, e.g. "adaptformer cannot tune the image tower EfficientNet (timm): it needs
            transformer blocks; methods that apply to it: full, bitfit, ssf, lora".
    """
    for tower in towers:
        reason = METHODS.get(method).refusal(model, tower)
        if reason:
            raise BalladError(
                f"{method} cannot tune the {tower} tower {tower_name(model, tower)}: {reason}; methods that apply to "
                f"it: {', '.join(applicable(model, tower))}"
            )


def tune(model: nn.Module, method: str, towers: Sequence[str], options: TuningOptions) -> list[nn.Parameter]:
    """Attach `method` to `towers` of `model`; every other parameter is frozen (the logit scale and bias, in no
    tower, always: BALLAD fixes the scale at 100, and an unused trainable parameter would stall DDP). Returns the
    trainable parameters
    (the tuner's, or the existing ones the method trains), in a fixed order.

    Raises:
        BalladError: the method does not apply to a tower (see `refuse_inapplicable`).
    """
    refuse_inapplicable(model, method, towers)
    for param in model.parameters():
        param.requires_grad_(False)
    tuner = nn.ModuleDict()
    for tower in towers:
        METHODS.get(method).attach(model, tower, options, tuner)
    if len(tuner):  # the tuner takes the model's device and floating dtype (a float64 model: float64 tuner)
        first = next(p for p in model.parameters() if p.is_floating_point())
        model.add_module(TUNER, tuner.to(device=first.device, dtype=first.dtype))
        for param in tuner.parameters():
            param.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def tuner_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method added (`model.ballad_tuner`), detached, on the CPU; empty when it added none."""
    tuner = getattr(model, TUNER, None)
    if tuner is None:
        return {}
    return {k: v.detach().contiguous().cpu() for k, v in tuner.state_dict().items()}


def load_tuner_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a method's tensors into a model it was attached to the same way.

    Raises:
        BalladError: names or shapes that do not match (another method, options or base architecture).
    """
    tuner = getattr(model, TUNER, None)
    own = tuner.state_dict() if tuner is not None else {}
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        missing = sorted(set(own) - set(state))[:2]
        extra = sorted(set(state) - set(own))[:2]
        bad = [k for k in own if k in state and own[k].shape != state[k].shape][:1]
        what = (
            f"missing {missing}, unexpected {extra}"
            if missing or extra
            else f"{bad[0]} is {tuple(state[bad[0]].shape)}, the model's {tuple(own[bad[0]].shape)}"
        )
        raise BalladError(f"{source} does not fit this model and method ({what}); train it again")
    if tuner is not None:
        tuner.load_state_dict(state)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain open_clip holds them: every parametrized tensor evaluated and every hooked SSF
    folded into its module (a folding method's update merged in), the tuner's modules left out. Detached, contiguous,
    on the CPU."""
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[0] == TUNER:
                continue
            prefix = f"{name}." if name else ""
            for key, value in module._parameters.items():
                if value is not None:
                    state[prefix + key] = value
            for key, value in module._buffers.items():
                if value is not None and key not in module._non_persistent_buffers_set:
                    state[prefix + key] = value
            if parametrize.is_parametrized(module):
                for key in module.parametrizations:
                    state[prefix + key] = getattr(module, key)
        state = {k: v.detach() for k, v in state.items() if ".parametrizations." not in f".{k}"}
        tuner = getattr(model, TUNER, None)
        for module in tuner.modules() if tuner is not None else ():
            if getattr(module, "site", ""):  # a hooked SSF: merged into the module it follows
                module.fold(state)
        return {k: v.contiguous().cpu() for k, v in state.items()}
