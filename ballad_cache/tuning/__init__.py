"""Phase A's tuning methods (`ballad finetune --method`): which parameters of a CLIP tower train and what is
injected. `methods` registers them (no torch at import), `modules` holds their trainable pieces, `tuned` attaches a
method to a model and reads its tensors back (merged or as tuner tensors)."""

from .methods import METHODS, TuningMethod, TuningOptions, register_method

__all__ = ["METHODS", "TuningMethod", "TuningOptions", "register_method"]
