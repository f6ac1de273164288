"""Liger kernels on a model instance: fused linear cross-entropy, RMSNorm, SwiGLU and RoPE from liger-kernel.

`train.liger` switches them (`resolve_liger`); `LigerKernels(model).apply()` patches one transformers model
through liger's own per-family entry point (`_apply_liger_kernel_to_instance`, what transformers' Trainer calls
for `use_liger_kernel`) and `remove()` puts back every attribute and module global the patch replaced, so a model
prepared for one configuration runs plainly again afterwards (execution.PreparedModel.undo).

Fused linear cross-entropy never forms the logits: in a training forward with labels it computes the loss and
the hidden states' gradient chunk by chunk from the LM head's weight, which it reads directly rather than through
the head's forward. Under ZeRO-3 that weight is a partitioned stub outside the head's own forward; holding it
gathered around the whole forward (GatheredParameters) failed on 2 H200s at 72B widths ("Cannot free a ZeRO-3
parameter while it is still active in submodules": the engine's hooks gather and release the head themselves).
So under ZeRO-3 (`partitioned=True`) the fused loss is left out and the other kernels are applied; `auto` does not
switch liger on there at all until that combination is measured (`resolve_liger`).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Union

import torch.nn as nn

from .config import ConfigError

# Dense families of arch.FAMILIES whose liger patch covers RMSNorm, SwiGLU, RoPE and the fused loss, with our LoRA
# targets unchanged (the MLP's forward is replaced, its linears are still called). MoE families stay out: liger
# replaces their expert forwards, which the expert adapters (adapters/experts.py) patch themselves.
LIGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_MISSING = object()


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(setting: Union[bool, str], device_type: str, family: str, zero3: bool = False) -> bool:
    """train.liger as this run will use it: `auto` is on where it can be (not under ZeRO-3, see the module's
    docstring), `true` where it cannot is refused."""
    if setting is False or (setting == "auto" and zero3):
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

    def __init__(self, model: nn.Module, partitioned: bool = False):
        self.model = model
        self.partitioned = partitioned  # ZeRO-3: no fused loss (it would read the partitioned head directly)
        self._attributes: list[tuple[nn.Module, dict]] = []
        self._globals: dict[str, object] = {}
        self._modeling = None

    def apply(self) -> "LigerKernels":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        modeling = sys.modules[type(self.model).__module__]
        globals_before = dict(vars(modeling))
        before = [(m, dict(vars(m))) for m in self.model.modules()]
        _apply_liger_kernel_to_instance(
            model=self.model, **({"fused_linear_cross_entropy": False} if self.partitioned else {})
        )
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
        return self

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
