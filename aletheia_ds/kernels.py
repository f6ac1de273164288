"""Liger kernels on a model instance: fused linear cross-entropy, RMSNorm, SwiGLU and RoPE from liger-kernel.

`train.liger` switches them (`resolve_liger`); `LigerKernels(model).apply()` patches one transformers model
through liger's own per-family entry point (`_apply_liger_kernel_to_instance`, what transformers' Trainer calls
for `use_liger_kernel`) and `remove()` puts back every attribute and module global the patch replaced, so a model
prepared for one configuration runs plainly again afterwards (execution.PreparedModel.undo).

Fused linear cross-entropy never forms the logits: in a training forward with labels it computes the loss and
the hidden states' gradient chunk by chunk from the LM head's weight, which it reads directly rather than through
the head's forward. Under ZeRO-3 that weight is a partitioned stub outside the head's own forward, so `apply`
takes a `gather` (DistContext.gathered) and holds the weight whole for that forward only: the gradient is
already computed there, so backward needs no gathered head at all.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Callable, ContextManager, Optional, Union

import torch.nn as nn

from .config import ConfigError

# Dense families of arch.FAMILIES whose liger patch covers RMSNorm, SwiGLU, RoPE and the fused loss, with our LoRA
# targets unchanged (the MLP's forward is replaced, its linears are still called). MoE families stay out: liger
# replaces their expert forwards, which the expert adapters (adapters/experts.py) patch themselves.
LIGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_MISSING = object()


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(setting: Union[bool, str], device_type: str, family: str) -> bool:
    """train.liger as this run will use it: `auto` is on where it can be, `true` where it cannot is refused."""
    if setting is False:
        return False
    if family not in LIGER_FAMILIES:
        problem = f"model type {family!r} is not one it patches here ({', '.join(LIGER_FAMILIES)})"
    elif device_type != "cuda":
        problem = f"its kernels are Triton GPU kernels and this run is on {device_type}"
    elif not liger_installed():
        problem = "liger-kernel is not installed (pip install 'aletheia-ds[liger]')"
    else:
        return True
    if setting == "auto":
        return False
    raise ConfigError(f"train.liger=true: {problem}; set train.liger=auto or false")


class LigerKernels:
    """Liger's patch of one transformers model (the CausalLM, not a PeftModel around it), undoable."""

    def __init__(self, model: nn.Module, gather: Optional[Callable[[list], ContextManager]] = None):
        self.model = model
        self.gather = gather  # ZeRO-3: DistContext.gathered; None when nothing is partitioned
        self._attributes: list[tuple[nn.Module, dict]] = []
        self._globals: dict[str, object] = {}
        self._modeling = None

    def apply(self) -> "LigerKernels":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        modeling = sys.modules[type(self.model).__module__]
        globals_before = dict(vars(modeling))
        before = [(m, dict(vars(m))) for m in self.model.modules()]
        _apply_liger_kernel_to_instance(model=self.model)
        # liger swaps module globals (the RoPE function, the norm and MLP classes) and binds methods and settings on
        # instances; what it changed is recorded here, so remove() restores exactly that and nothing else
        self._modeling = modeling
        self._globals = {
            k: globals_before.get(k, _MISSING)
            for k, v in vars(modeling).items()
            if globals_before.get(k, _MISSING) is not v
        }
        for module, saved in before:
            changed = {k: saved.get(k, _MISSING) for k, v in vars(module).items() if saved.get(k, _MISSING) is not v}
            if changed:
                self._attributes.append((module, changed))
        if self.gather is not None:
            self._gather_head_in_loss()
        return self

    def _gather_head_in_loss(self) -> None:
        if not self.fused_loss:
            return  # the head's own forward runs, and its ZeRO-3 hooks gather it
        model, gather = self.model, self.gather
        head = model.get_output_embeddings()
        fused = model.forward  # liger's forward, bound to the instance

        @functools.wraps(fused)
        def forward(*args, **kwargs):
            # liger skips the logits (and reads the head's weight directly) exactly when training with labels;
            # otherwise it calls the head's forward, whose own ZeRO-3 hooks gather it
            if model.training and kwargs.get("labels") is not None:
                with gather([head.weight]):
                    return fused(*args, **kwargs)
            return fused(*args, **kwargs)

        model.forward = forward  # replaces liger's instance forward, which remove() already pops

    @property
    def fused_loss(self) -> bool:
        """True when the training forward computes the loss without logits (liger patched the CausalLM forward)."""
        return "forward" in vars(self.model)

    def remove(self) -> None:
        for module, changed in reversed(self._attributes):
            for key, value in changed.items():
                if value is _MISSING:
                    vars(module).pop(key, None)
                else:
                    vars(module)[key] = value  # the instance dict itself: these are never parameters or submodules
        for key, value in self._globals.items():
            if value is _MISSING:
                vars(self._modeling).pop(key, None)
            else:
                setattr(self._modeling, key, value)
        self._attributes, self._globals = [], {}
