"""Expert LoRA on the routed tokens only: for each planned expert e, y_e += s (x_e A_e^T) B_e^T on the tokens routed
to e, batched over experts by a grouped matrix product.

PEFT adapts a transformers-5 fused bank (E, out, in) through `target_parameters`: every step it forms W + s B A
for the whole bank (each expert, planned or not, however few tokens it received), keeps that bank-sized copy for
backward and folds a bank-sized gradient back into dA and dB. The adapter itself stays PEFT's (its ParamWrapper
modules and parameters: lora_A (E*r, in) viewed (E, r, in), lora_B (out, r*E) viewed (out, r, E); unplanned
experts' blocks held at zero by attach.keep_planned_experts_only), so saving, `PeftModel.from_pretrained`, merging
and every check read exactly what they read before. Only the training forward changes.

Where it hooks: transformers 5 routes in the MoE block (router -> top_k_index, top_k_weights) and hands the tokens
to the `experts` module, whose forward is the per-family entry point that `use_experts_implementation` dispatches
(`grouped_mm`, `batched_mm`, eager). PEFT wraps that module in its ParamWrappers; the outermost wrapper's forward
is replaced here by `routed_experts_forward`, which takes the block's routing as given and runs the experts as
transformers' `grouped_mm` implementation does (sort the (token, k) pairs by expert, one grouped product per
bank, gate, routing weights, sum over k), plus the LoRA terms:

    h   = grouped(x_g, W_first) [+ bias]  +  s * grouped(grouped(x_p, A_p^T), B_p^T)   scattered to the planned rows
    act = gate(h);   y = grouped(act, W_down) [+ bias]  +  the same on act

where x_p are the rows routed to planned experts. When every expert is planned the rows are used in place; else
the planned rows are gathered once per layer (one host sync, for their count), so an unplanned expert costs no
LoRA work at all. Gradients reach only lora_A/lora_B blocks of planned experts (index_select's backward), as in
PEFT's path, where the unplanned blocks' gradients are exactly zero.

Grouped products: torch's grouped matmul (`torch.nn.functional.grouped_mm`, else `torch._grouped_mm`) on CUDA bf16
with 16-byte aligned rows, where the GPU has it (sm90; sm80 from torch 2.9); otherwise a loop over the experts
with one host sync (CPU, fp32, old GPUs). The package `grouped_gemm` (megablocks') is not used: it needs the group
sizes on the host and covers only what torch's own kernel covers from 2.9 on.

The PEFT path is kept whenever this one does not apply: an adapter disabled or merged, several adapters active,
expert parallelism, an experts module without the transformers-5 attributes, or `lora.expert_forward=peft`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_TORCH_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# "grouped" forces torch's grouped kernel wherever torch has one (the tests run it on CPU in bf16), "loop" the
# fallback; None chooses per product (`_grouped_kernel_applies`)
FORCE_KERNEL: Optional[str] = None


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def _grouped_kernel_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _TORCH_GROUPED_MM is None or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if FORCE_KERNEL is not None:
        return FORCE_KERNEL == "grouped"
    if not x.is_cuda:
        return False  # CPU kernels of torch < 2.11 reject some strides in backward; the loop is fine there
    # rows of bf16 operands must start on 16-byte boundaries
    if x.shape[-1] % 8 or w.shape[-1] % 8 or w.shape[-2] % 8:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    return capability >= (9, 0) or (capability >= (8, 0) and _torch_at_least(2, 9))


def _loop_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One product per group, with the group ends read once to the host."""
    pieces, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            pieces.append(x[start:end] @ w[group])
        start = end
    return torch.cat(pieces) if pieces else x[:0] @ w[0]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S, K) rows grouped by expert  x  (G, K, N) per-group weights -> (S, N); `offsets` (G,) int32 holds each
    group's end row, the last one equal to S."""
    if _grouped_kernel_applies(x, w):
        return _TORCH_GROUPED_MM(x, w, offs=offsets)
    return _loop_mm(x, w, offsets)


class BankLoRA:
    """One fused bank's PEFT ParamWrapper, read as per-expert factors (the module docstring's layout)."""

    def __init__(self, wrapper: nn.Module, adapter: str):
        self.wrapper, self.adapter = wrapper, adapter
        self.num_experts = int(wrapper.num_experts)
        self.scaling = float(wrapper.scaling[adapter])

    def factors(self, index: Optional[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T (n, in, r), B^T (n, r, out)) of the experts in `index` (None: all), in `dtype`."""
        a = self.wrapper.lora_A[self.adapter].weight
        b = self.wrapper.lora_B[self.adapter].weight
        a = a.view(self.num_experts, -1, a.shape[-1])  # (E, r, in)
        b = b.view(b.shape[0], -1, self.num_experts)  # (out, r, E)
        if index is not None:
            a, b = a.index_select(0, index), b.index_select(2, index)
        # (n, out, r) made contiguous, then viewed (n, r, out): the layout grouped kernels accept for a weight
        b = b.to(dtype).permute(2, 0, 1).contiguous()
        return a.to(dtype).transpose(1, 2), b.transpose(1, 2)


class _PlannedRows:
    """Where the rows (sorted by expert) of planned experts are, shared by both banks of one forward."""

    def __init__(self, sorted_ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, planned: torch.Tensor):
        if planned.numel() == counts.numel():  # every expert planned: all rows, in place
            self.rows, self.index, self.offsets = None, None, offsets
            return
        lookup = torch.zeros(counts.numel(), dtype=torch.bool, device=counts.device)
        lookup[planned] = True
        self.rows = lookup[sorted_ids].nonzero().squeeze(1)  # sorted by expert already: planned groups in order
        self.index = planned
        self.offsets = counts.index_select(0, planned).cumsum(0).to(torch.int32)

    def add(self, base: torch.Tensor, x: torch.Tensor, lora: BankLoRA) -> torch.Tensor:
        """base + s * (x A_e^T) B_e^T on the planned rows."""
        a_t, b_t = lora.factors(self.index, base.dtype)
        x = (x if self.rows is None else x.index_select(0, self.rows)).to(base.dtype)
        delta = grouped_mm(grouped_mm(x, a_t, self.offsets) * lora.scaling, b_t, self.offsets)
        return base + delta if self.rows is None else base.index_add(0, self.rows, delta)


def _bank_product(
    experts: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, sorted_ids: torch.Tensor
) -> torch.Tensor:
    weight = getattr(experts, name)
    x = x.to(weight.dtype)
    # transposed banks are stored (E, in, out) already; the usual (E, out, in) is read transposed
    out = grouped_mm(x, weight if experts.is_transposed else weight.transpose(1, 2), offsets)
    if experts.has_bias:
        out = out + getattr(experts, f"{name}_bias")[sorted_ids]
    return out


# the expert products have data-dependent sizes (and the fallback reads group ends to the host): compiled
# regions around this call run it eagerly rather than recompile per routing
@torch.compiler.disable
def routed_experts_forward(
    experts: nn.Module,
    banks: dict[str, BankLoRA],
    planned: torch.Tensor,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' grouped experts forward (integrations/moe.py grouped_mm_experts_forward) with LoRA on the
    banks in `banks`, applied to the rows routed to the experts in `planned` (sorted, on the device)."""
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    counts = torch.bincount(sorted_ids, minlength=experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    rows = _PlannedRows(sorted_ids, counts, offsets, planned)
    x = hidden_states[order // top_k]

    first = "gate_up_proj" if experts.has_gate else "up_proj"
    hidden = _bank_product(experts, first, x, offsets, sorted_ids)
    if first in banks:
        hidden = rows.add(hidden, x, banks[first])
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    out = _bank_product(experts, "down_proj", hidden, offsets, sorted_ids)
    if "down_proj" in banks:
        out = rows.add(out, hidden, banks["down_proj"])
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy(0, order, out)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _supported(experts: nn.Module) -> bool:
    """An experts module of transformers 5's form (`use_experts_implementation`), on one process's experts."""
    needed = ("num_experts", "down_proj", "has_gate", "has_bias", "is_transposed", "act_fn")
    if not all(hasattr(experts, n) for n in needed) or getattr(experts, "_is_expert_parallel", False):
        return False
    return hasattr(experts, "gate_up_proj" if experts.has_gate else "up_proj") and (
        not experts.has_gate or hasattr(experts, "_apply_gate")
    )


class RoutedExperts:
    """The routed forward of one experts module, installed on its outermost PEFT wrapper."""

    def __init__(self, outer: nn.Module, planned: list[int], adapter: str = "default"):
        from peft.tuners.lora.layer import ParamWrapper

        self.wrappers: list[nn.Module] = []
        module = outer
        while isinstance(module, ParamWrapper):
            self.wrappers.append(module)
            module = module.base_layer
        self.experts, self.adapter = module, adapter
        self.banks = {w.parameter_name: BankLoRA(w, adapter) for w in self.wrappers if adapter in w.lora_A}
        self.planned = sorted(planned)
        self._planned_index: Optional[torch.Tensor] = None

    @property
    def supported(self) -> bool:
        return bool(self.banks) and _supported(self.experts)

    def applies(self, kwargs: dict) -> bool:
        """False where PEFT's own forward must run (module docstring)."""
        if kwargs.get("adapter_names") is not None:
            return False
        return all(
            not w.disable_adapters and not w.merged and list(w.active_adapters) == [self.adapter] for w in self.wrappers
        )

    def planned_index(self, device: torch.device) -> torch.Tensor:
        if self._planned_index is None or self._planned_index.device != device:
            self._planned_index = torch.tensor(self.planned, dtype=torch.long, device=device)
        return self._planned_index

    def wrap(self, peft_forward: Callable) -> Callable:
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            if args or not self.applies(kwargs):
                return peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            planned = self.planned_index(hidden_states.device)
            return routed_experts_forward(self.experts, self.banks, planned, hidden_states, top_k_index, top_k_weights)

        return forward


def _base(peft_model: nn.Module) -> nn.Module:
    inner = getattr(getattr(peft_model, "base_model", None), "model", None)
    return inner if isinstance(inner, nn.Module) else peft_model


def route_expert_lora(peft_model: nn.Module, plan, adapter: str = "default") -> list[str]:
    """Install the routed forward on every transformers-5 experts module with planned experts; returns their names
    (modules it cannot serve keep PEFT's forward)."""
    routed = []
    base = _base(peft_model)
    for layer, experts in plan.experts_by_layer().items():
        block = plan.moe[layer]
        if block.style != "hf":
            continue
        name = plan.module_name(layer, block.experts_path)
        outer = base.get_submodule(name)
        hook = RoutedExperts(outer, [e.expert for e in experts], adapter)
        if hook.supported:
            outer.forward = hook.wrap(outer.forward)  # an instance attribute: the class's forward stays PEFT's
            outer._routed_experts = hook
            routed.append(name)
    return routed


def routed_expert_modules(peft_model: nn.Module) -> list[str]:
    """Names of the experts modules that run the routed forward (module names as in the plan)."""
    return [name for name, m in _base(peft_model).named_modules() if hasattr(m, "_routed_experts")]
