"""Frozen-prefix execution: where backward can stop, make sure it does.

Layers below the lowest adapted layer hold no trainable parameter, so their activations are never
needed for a gradient. They run under `no_grad` (nothing saved, no autograd node), without gradient
checkpointing (nothing to recompute), and any hook that makes the embedding output require grad
(`enable_input_require_grads`, the usual fix for reentrant checkpointing) is removed: it would force
backward through every layer. Gradient checkpointing, when on, is non-reentrant and covers only the
adapted span. Loss and LoRA gradients are exactly those of the plain path (tests check it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class FrozenPrefix:
    """Apply on a (PEFT-wrapped) model; `remove()` restores the plain path."""

    def __init__(self, model: nn.Module, layers_path: str, lowest_adapted_layer: int):
        self.model = base_model(model)
        self.layers = self.model.get_submodule(layers_path)
        self.lowest = lowest_adapted_layer
        self._saved: list[tuple[nn.Module, object, bool]] = []

    def apply(self) -> "FrozenPrefix":
        embeddings = self.model.get_input_embeddings()
        if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
            raise ValueError("frozen prefix: the input embeddings are trainable; the prefix cannot be frozen")
        if hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()
        for index in range(self.lowest):
            layer = self.layers[index]
            if any(p.requires_grad for p in layer.parameters()):
                raise ValueError(f"frozen prefix: layer {index} below the lowest adapted layer {self.lowest} "
                                 "has trainable parameters")
            # an instance attribute shadows the class's forward; None marks "there was none" for remove()
            self._saved.append((layer, layer.__dict__.get("forward"), getattr(layer, "gradient_checkpointing", False)))
            layer.forward = _no_grad(layer.forward)
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = False  # nothing to recompute below the cut
        return self

    def remove(self) -> None:
        for layer, forward, checkpointing in self._saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = checkpointing
        self._saved = []


def _no_grad(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    return run


def compile_adapted_layers(model: nn.Module, layers_path: str, lowest: int) -> None:
    """torch.compile each layer of the adapted span (regional compilation: one graph per distinct layer
    structure, shared by the layers that have it). Layers with different adapter sets are different
    structures, so the recompile limit is raised to the number of layers."""
    import torch._dynamo

    layers = model.get_submodule(layers_path)
    limit = max(8, len(layers) + 2)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for index in range(lowest, len(layers)):
        layers[index].compile()
