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


class PrefixCache:
    """Multi-epoch shortcut: keep each example's hidden states at the cut, skip the prefix when replaying.

    With frozen weights and no dropout, the output of the frozen prefix for an example is the same every
    epoch (right padding + causal attention: an example's positions never see another's or a pad). The
    first time an example is seen, the output of layer `lowest - 1` is stored (CPU memory, the model's
    dtype: hidden_size x 2 bytes per token in bf16); when every example of a micro-batch is stored, the
    prefix layers pass their input through untouched and layer `lowest` receives the stored states.
    The loop names the micro-batch's examples with `begin(indices, attention_mask)`; `begin(None)` (e.g.
    for evaluation) turns both filling and replay off.
    """

    def __init__(self, model: nn.Module, layers_path: str, lowest_adapted_layer: int):
        self.layers = base_model(model).get_submodule(layers_path)
        self.lowest = lowest_adapted_layer
        if self.lowest == 0:
            raise ValueError("prefix cache: the plan adapts layer 0, there is no frozen prefix to cache")
        dropouts = [name for index in range(self.lowest) for name, m in self.layers[index].named_modules()
                    if isinstance(m, nn.Dropout) and m.p > 0]
        if dropouts:
            raise ValueError(f"prefix cache: dropout is active in the frozen prefix ({dropouts[0]}); "
                             "its output changes every epoch")
        self.store: dict[int, torch.Tensor] = {}
        self.stored_bytes = 0
        self.hits = self.misses = 0
        self._indices: list[int] | None = None
        self._lengths: list[int] = []
        self._replay = False
        self._handles: list = []
        self._forwards: list[tuple[nn.Module, object]] = []

    def apply(self) -> "PrefixCache":
        for index in range(self.lowest):
            layer = self.layers[index]
            self._forwards.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._skippable(layer.forward)
        self._handles.append(self.layers[self.lowest - 1].register_forward_hook(self._fill))
        self._handles.append(self.layers[self.lowest].register_forward_pre_hook(self._substitute, with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, forward in self._forwards:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        self._handles, self._forwards = [], []

    def begin(self, indices: list[int] | None, attention_mask: torch.Tensor | None = None) -> bool:
        """Name the next forward's examples; returns True when it will replay from the cache."""
        self._indices = list(indices) if indices is not None else None
        if self._indices is None:
            self._replay = False
            return False
        mask = attention_mask if attention_mask is not None else None
        self._lengths = [int(x) for x in mask.sum(dim=1)] if mask is not None else []
        self._replay = all(i in self.store for i in self._indices)
        if self._replay:
            self.hits += 1
        else:
            self.misses += 1
        return self._replay

    def _skippable(self, forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if self._replay:
                return args[0] if args else kwargs["hidden_states"]
            return forward(*args, **kwargs)

        return run

    def _fill(self, _module, _args, output) -> None:
        if self._indices is None or self._replay:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"prefix cache: decoder layers return {type(output).__name__}, not a tensor")
        for row, index in enumerate(self._indices):
            if index not in self.store:
                length = self._lengths[row] if self._lengths else output.shape[1]
                kept = output[row, :length].detach().to("cpu", copy=True)
                self.store[index] = kept
                self.stored_bytes += kept.numel() * kept.element_size()

    def _substitute(self, _module, args, kwargs):
        if not self._replay:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        stored = torch.zeros_like(hidden)
        for row, index in enumerate(self._indices):
            saved = self.store[index]
            stored[row, :saved.shape[0]] = saved.to(hidden.device, hidden.dtype, non_blocking=True)
        if args:
            return (stored, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": stored}
