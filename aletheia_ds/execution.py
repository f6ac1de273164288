"""Execution of a plan: the adapters attached and the model made to run them cheaply, in one place.

`prepared(model, plan, layout, options)` attaches the plan's adapters and applies what `ExecutionOptions`
asks for (adapter dtype, checkpointing of the adapted span or of its lower part, frozen prefix, prefix cache,
shared prefix, compiled span, Liger kernels);
on exit the base model is as it was. The training run (train.py, under DeepSpeed), the timing harness
(speed.py) and single-device studies with a plain torch optimizer all prepare a model through it.

Frozen prefix: where backward can stop, make sure it does.

Layers below the lowest adapted layer hold no trainable parameter, so their activations are never
needed for a gradient. They run under `no_grad` (nothing saved, no autograd node), without gradient
checkpointing (nothing to recompute), and any hook that makes the embedding output require grad
(`enable_input_require_grads`, the usual fix for reentrant checkpointing) is removed: it would force
backward through every layer. Gradient checkpointing, when on, is non-reentrant and covers only the
adapted span. Loss and LoRA gradients are exactly those of the plain path (tests check it).

Shared prefix (preference objectives with a reference, train.objective=dpo): the reference is the same model
with the adapters disabled, and below the cut there is no adapter, so the reference's and the policy's hidden
states there are identical. `PreparedModel.objective_loss` runs the reference first and keeps the frozen
prefix's output; the policy pass then starts at the lowest adapted layer. Saved per step: one forward of the
prefix (lowest / num_layers of a forward), exactly (the same tensors, not an approximation).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .adapters.attach import attach
from .arch import Layout
from .config import LoraSection
from .kernels import LigerKernels
from .objectives import Objective, PreferenceOutput, sequence_logps
from .plan import Plan


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class PatchedForward:
    """`module.forward` replaced by `wrap(module.forward)` as an instance attribute until `restore()`.

    An instance attribute shadows the class's forward, so restoring means deleting it again; a forward
    patched earlier (e.g. the frozen prefix's under the prefix cache's) is put back instead. Patches are
    restored in the reverse order of applying them.
    """

    def __init__(self, module: nn.Module, wrap: Callable[[Callable], Callable]):
        self.module = module
        self._earlier_patch = module.__dict__.get("forward")  # None: the class's forward
        module.forward = wrap(module.forward)

    def restore(self) -> None:
        if self._earlier_patch is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._earlier_patch

    def __enter__(self) -> "PatchedForward":
        return self

    def __exit__(self, *_exc) -> None:
        self.restore()


def patched_forward(module: nn.Module, wrap: Callable[[Callable], Callable]) -> PatchedForward:
    """Replace `module.forward` by `wrap(module.forward)`; the returned patch restores it (or use it in `with`)."""
    return PatchedForward(module, wrap)


class FrozenPrefix:
    """Apply on a (PEFT-wrapped) model; `remove()` restores the plain path."""

    def __init__(self, model: nn.Module, layers_path: str, lowest_adapted_layer: int):
        self.model = base_model(model)
        self.layers = self.model.get_submodule(layers_path)
        self.lowest = lowest_adapted_layer
        self._saved: list[tuple[PatchedForward, bool]] = []

    def apply(self) -> "FrozenPrefix":
        embeddings = self.model.get_input_embeddings()
        if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
            raise ValueError("frozen prefix: the input embeddings are trainable; the prefix cannot be frozen")
        if hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()
        for index in range(self.lowest):
            layer = self.layers[index]
            if any(p.requires_grad for p in layer.parameters()):
                raise ValueError(
                    f"frozen prefix: layer {index} below the lowest adapted layer {self.lowest} "
                    "has trainable parameters"
                )
            self._saved.append((patched_forward(layer, _no_grad), getattr(layer, "gradient_checkpointing", False)))
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = False  # nothing to recompute below the cut
        return self

    def remove(self) -> None:
        for patch, checkpointing in self._saved:
            patch.restore()
            if hasattr(patch.module, "gradient_checkpointing"):
                patch.module.gradient_checkpointing = checkpointing
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


class PrefixCacheError(ValueError):
    """The prefix cache cannot serve this model and plan (the message says why)."""


class PrefixBypass:
    """Layers below `lowest` can be skipped, layer `lowest` then starting from hidden states computed before.

    While `bypassing()` is true the prefix layers return their input untouched (a pass-through is cheaper than
    a decision inside the model's own loop, which every family writes differently) and layer `lowest` receives
    `stored_for(hidden)` instead of what reached it; otherwise the output of layer `lowest - 1` is handed to
    `keep(output)`. PrefixCache keeps it per example across epochs, SharedPrefix per batch across the
    reference and policy passes of one step.
    """

    def __init__(self, model: nn.Module, layers_path: str, lowest_adapted_layer: int):
        self.layers = base_model(model).get_submodule(layers_path)
        self.lowest = lowest_adapted_layer
        self._handles: list = []
        self._patches: list[PatchedForward] = []

    def bypassing(self) -> bool:
        raise NotImplementedError

    def keep(self, output: torch.Tensor) -> None:
        raise NotImplementedError

    def stored_for(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self):
        self._patches = [patched_forward(self.layers[index], self._skippable) for index in range(self.lowest)]
        self._handles.append(self.layers[self.lowest - 1].register_forward_hook(self._kept))
        self._handles.append(self.layers[self.lowest].register_forward_pre_hook(self._substitute, with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for patch in reversed(self._patches):
            patch.restore()
        self._handles, self._patches = [], []

    def _skippable(self, forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if self.bypassing():
                return args[0] if args else kwargs["hidden_states"]
            return forward(*args, **kwargs)

        return run

    def _kept(self, _module, _args, output) -> None:
        if self.bypassing():
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"prefix bypass: decoder layers return {type(output).__name__}, not a tensor")
        self.keep(output)

    def _substitute(self, _module, args, kwargs):
        if not self.bypassing():
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        stored = self.stored_for(hidden)
        if args:
            return (stored, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": stored}


class SharedPrefix(PrefixBypass):
    """The frozen prefix's output of the reference pass, replayed into the policy pass of the same batch."""

    def __init__(self, model: nn.Module, layers_path: str, lowest_adapted_layer: int):
        super().__init__(model, layers_path, lowest_adapted_layer)
        self._capturing = self._replaying = False
        self._hidden: Optional[torch.Tensor] = None

    def bypassing(self) -> bool:
        return self._replaying

    def keep(self, output: torch.Tensor) -> None:
        if self._capturing:
            self._hidden = output.detach()

    def stored_for(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._hidden is None or self._hidden.shape != hidden.shape:
            raise RuntimeError("shared prefix: the policy pass is not on the reference pass's batch")
        return self._hidden

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self._hidden, self._capturing = None, True
        try:
            yield
        finally:
            self._capturing = False

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self._hidden is None:  # nothing captured (e.g. the reference pass failed): the full pass
            yield
            return
        self._replaying = True
        try:
            yield
        finally:
            self._replaying, self._hidden = False, None


class PrefixCache(PrefixBypass):
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
        super().__init__(model, layers_path, lowest_adapted_layer)
        if self.lowest == 0:
            raise PrefixCacheError("prefix cache: the plan adapts layer 0, there is no frozen prefix to cache")
        dropouts = [
            name
            for index in range(self.lowest)
            for name, m in self.layers[index].named_modules()
            if isinstance(m, nn.Dropout) and m.p > 0
        ]
        if dropouts:
            raise PrefixCacheError(
                f"prefix cache: dropout is active in the frozen prefix ({dropouts[0]}); its output changes every epoch"
            )
        self.store: dict[int, torch.Tensor] = {}
        self.stored_bytes = 0
        self.hits = self.misses = 0
        self._indices: list[int] | None = None
        self._lengths: list[int] = []
        self._replay = False

    def summary(self) -> dict[str, int]:
        """What the run's results record of the cache (eval.json "prefix_cache")."""
        return {
            "examples": len(self.store),
            "bytes": self.stored_bytes,
            "replayed_micro_batches": self.hits,
            "computed_micro_batches": self.misses,
        }

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

    def bypassing(self) -> bool:
        return self._replay

    def keep(self, output: torch.Tensor) -> None:
        if self._indices is None:
            return
        for row, index in enumerate(self._indices):
            if index not in self.store:
                length = self._lengths[row] if self._lengths else output.shape[1]
                kept = output[row, :length].detach().to("cpu", copy=True)
                self.store[index] = kept
                self.stored_bytes += kept.numel() * kept.element_size()

    def stored_for(self, hidden: torch.Tensor) -> torch.Tensor:
        stored = torch.zeros_like(hidden)
        for row, index in enumerate(self._indices):
            saved = self.store[index]
            stored[row, : saved.shape[0]] = saved.to(hidden.device, hidden.dtype, non_blocking=True)
        return stored


@dataclass(frozen=True)
class ExecutionOptions:
    """How a plan's adapters run. The defaults are this project's path: frozen prefix on, nothing else."""

    lora: LoraSection = field(default_factory=LoraSection)  # dropout, and the adapters' init seed
    adapter_dtype: Optional[torch.dtype] = None  # e.g. bf16, as DeepSpeed's bf16 engine computes them; None: PEFT's
    checkpointing: bool = False  # non-reentrant; the frozen prefix turns it off below the cut
    frozen_prefix: bool = True
    # HF Trainer's recipe with checkpointing (the embedding output requires grad, so backward runs through
    # every layer): the "standard" path the benchmarks compare against
    input_require_grads: bool = False
    prefix_cache: bool = False  # PrefixCache: the caller names each micro-batch's examples with begin()
    # SharedPrefix: objective_loss's reference and policy passes share the frozen prefix (needs frozen_prefix)
    shared_prefix: bool = False
    compile_layers: bool = False  # regional torch.compile of the adapted span
    # under checkpointing, the top N adapted layers keep their activations (no recompute); PreparedModel.set_recompute
    no_recompute_layers: int = 0
    liger: bool = False  # Liger kernels (kernels.LigerKernels); train.liger resolved by kernels.resolve_liger
    partitioned: bool = False  # ZeRO-3 partitions the weights: liger without its fused loss (kernels.py)


@dataclass
class PreparedModel:
    """A base model with a plan's adapters attached and run as its ExecutionOptions ask."""

    peft_model: nn.Module
    layers_path: str
    options: ExecutionOptions
    frozen_prefix: Optional[FrozenPrefix] = None
    prefix_cache: Optional[PrefixCache] = None
    liger: Optional[LigerKernels] = None
    lowest_adapted_layer: int = 0
    shared_prefix: Optional[SharedPrefix] = None

    @classmethod
    def apply(cls, model: nn.Module, plan: Plan, layout: Layout, options: ExecutionOptions) -> "PreparedModel":
        """Attach and prepare; the caller owns `undo()` (`prepared(...)` does it on exit). A failure part-way
        undoes what was already applied."""
        prepared_model = cls(attach(model, plan, options.lora), layout.layers_path, options)
        try:
            prepared_model._prepare(plan.lowest_adapted_layer)
        except BaseException:
            prepared_model.undo()
            raise
        return prepared_model

    @property
    def base(self) -> nn.Module:
        return base_model(self.peft_model)

    def _prepare(self, lowest_adapted_layer: int) -> None:
        options, base = self.options, self.base
        self.lowest_adapted_layer = lowest_adapted_layer
        if options.liger:
            self.liger = LigerKernels(base, partitioned=options.partitioned).apply()
        if options.adapter_dtype is not None:
            for name, p in self.peft_model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(options.adapter_dtype)
        if options.checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if options.input_require_grads:
            base.enable_input_require_grads()
        if options.frozen_prefix:
            self.frozen_prefix = FrozenPrefix(self.peft_model, self.layers_path, lowest_adapted_layer).apply()
        if options.checkpointing and options.no_recompute_layers:
            self.set_recompute(options.no_recompute_layers)
        if options.compile_layers:
            compile_adapted_layers(base, self.layers_path, lowest_adapted_layer)
        if options.prefix_cache:
            self.prefix_cache = PrefixCache(self.peft_model, self.layers_path, lowest_adapted_layer).apply()
        if options.shared_prefix and options.frozen_prefix and lowest_adapted_layer > 0:
            self.shared_prefix = SharedPrefix(self.peft_model, self.layers_path, lowest_adapted_layer).apply()

    def objective_loss(
        self,
        forward: Callable[[dict], object],
        batch: dict,
        objective: Objective,
        router_aux_loss_coef: float = 0.0,
    ) -> tuple[torch.Tensor, Optional[PreferenceOutput]]:
        """The loss of `objective` on a collated batch; `forward(inputs)` runs the (engine-wrapped) model.

        SFT: the model's own token loss. Preference: the policy's loss on the pairs; with a reference (DPO) the
        reference pass comes first, under no_grad with the adapters disabled (PEFT's disable_adapter: the base
        model, never a second copy), its logits reduced to log-probs before the policy pass so that the two
        passes' logits are never alive together; with a shared prefix the policy pass starts at the cut.
        `router_aux_loss_coef` > 0 (mixture-of-experts models, training steps): plus that weight of the policy
        pass's router load-balancing loss over every layer's routers, as TRL adds it (objectives.
        router_aux_loss_coef; the model's own router_aux_loss_coef must hold the same weight for SFT).
        """
        aux = {"output_router_logits": True} if router_aux_loss_coef else {}
        if not objective.preference:
            # the model adds its router_aux_loss_coef x its load-balancing loss to the token loss itself
            return forward({**batch, **aux}).loss, None
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}  # no token loss over the vocab
        reference = None
        shared = self.shared_prefix
        if objective.uses_reference:
            with torch.no_grad(), self.peft_model.disable_adapter(), shared.capture() if shared else _nothing():
                reference = sequence_logps(forward(inputs).logits, labels)
        with shared.replay() if shared and reference is not None else _nothing():
            policy = forward({**inputs, **aux})
        out = objective.loss(policy.logits, labels, reference)
        if aux:
            return out.loss + router_aux_loss_coef * policy.aux_loss, out
        return out.loss, out

    def set_recompute(self, no_recompute_layers: int) -> list[int]:
        """Under checkpointing: the top `no_recompute_layers` adapted layers run without it (their activations kept,
        no recompute), the rest of the adapted span with it; the frozen prefix stays as it is. Loss and gradients
        do not change (non-reentrant checkpointing recomputes exactly). Returns the layers that no longer recompute.
        May be called between steps (train.no_recompute_layers=auto decides after the first)."""
        layers = self.base.get_submodule(self.layers_path)
        span = range(self.lowest_adapted_layer, len(layers))
        kept = list(span)[len(span) - min(no_recompute_layers, len(span)) :]
        for index in span:
            if hasattr(layers[index], "gradient_checkpointing"):
                layers[index].gradient_checkpointing = self.options.checkpointing and index not in kept
        return kept

    def undo(self) -> None:
        """Everything `apply` did, in reverse: the adapters are removed (PEFT unload, no merge) and the base
        model runs its plain path again."""
        base = self.base
        if self.shared_prefix is not None:
            self.shared_prefix.remove()
        if self.prefix_cache is not None:
            self.prefix_cache.remove()
        if self.frozen_prefix is not None:
            self.frozen_prefix.remove()
        if self.options.checkpointing:
            base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
        if self.options.compile_layers:
            for layer in base.get_submodule(self.layers_path):
                layer._compiled_call_impl = None  # drop the compiled wrapper (nn.Module.compile sets it)
        if self.liger is not None:
            self.liger.remove()
        device = next(base.parameters()).device
        self.peft_model.unload()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next configuration's peak memory starts from the base model alone


_nothing = contextlib.nullcontext


@contextlib.contextmanager
def prepared(
    model: nn.Module, plan: Plan, layout: Layout, options: Optional[ExecutionOptions] = None
) -> Iterator[PreparedModel]:
    """`model` with `plan`'s adapters, run as `options` asks, for any loop on one device (a plain torch
    optimizer over the trainable parameters of `.peft_model`); on exit `model` is the plain base model again.

        with prepared(model, plan, layout, ExecutionOptions(checkpointing=True)) as run:
            loss = run.peft_model(**batch, use_cache=False).loss
    """
    prepared_model = PreparedModel.apply(model, plan, layout, options or ExecutionOptions())
    try:
        yield prepared_model
    finally:
        prepared_model.undo()
