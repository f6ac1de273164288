"""Per-expert ||dL/dW_e||_F, routing load and router scores of MoE layers, without weight gradients.

A fused bank keeps every expert's copy of a linear in one parameter (transformers 5: `gate_up_proj`
(E, 2I, H), `down_proj` (E, H, I); megablocks: `w1`, `v1`, `w2` of shape (E*F, H)) and runs them in one
grouped kernel, so there is no per-expert module to hook. During the probe the experts module's forward
is replaced by the per-expert loop that transformers ships as its eager reference (tokens routed to
expert e -> first bank -> gate/activation -> last bank -> routing weight -> sum over the top-k). Inside
that loop every bank of every expert is an ordinary linear map x_e -> y_e, so the rule of hooks.py
applies unchanged: keep x_e, receive g_e = dL/dy_e in backward, add ||g_e^T x_e||_F^2, free x_e.
Under the probe's own checkpointing (hooks.CheckpointPhase) the first run only registers the hook on y_e
and the recompute, during the layer's backward, supplies x_e: one layer's expert inputs are held at a time.
The original forward is put back afterwards; the weights are only read, never given `.grad`.

The router's first output is its logits x W_r^T (HF TopKRouter; megablocks' router.layer is a Linear),
so the router score is the same product on the router's input and the gradient of its logits.
Routing load counts real (non-pad) tokens routed to each expert in the measured passes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import Layout, MoeBlock
from ..execution import PatchedForward, patched_forward
from .hooks import CheckpointPhase, Rendezvous, compute_dtype_for, drop_padding_here, flat_tokens, weight_grad_sq_norm
from .report import ExpertScore


def _bank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


class ExpertProbe(Rendezvous):
    """Accumulates per (MoE layer, expert, bank) sum over batches of ||dL_b/dW_e||_F^2, tokens and router norms.

    `token_mask` and `batch_weight` are set per batch by the caller (run_probe), as for GradNormHooks.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        compute_dtype: torch.dtype | None = None,
        phase: CheckpointPhase | None = None,
    ):
        super().__init__()  # keys: ("bank", layer slot, expert, bank) and ("router", layer slot)
        self.phase = phase
        self.entries: list[tuple[int, MoeBlock, nn.Module]] = list(layout.iter_moe(model))
        self.compute_dtype = compute_dtype
        self.max_experts = max((b.num_experts for _, b, _ in self.entries), default=0)
        self.max_banks = max((len(b.banks) for _, b, _ in self.entries), default=0)
        self.token_mask: torch.Tensor | None = None
        self.batch_weight = 1.0
        self.sq_norms: torch.Tensor | None = None  # (moe layers, experts, banks)
        self.tokens: torch.Tensor | None = None  # (moe layers, experts)
        self.router_sq: torch.Tensor | None = None  # (moe layers,)

    @property
    def size(self) -> int:
        """Length of the flat tensor that `local()` returns (and that ranks all-reduce)."""
        n = len(self.entries)
        return n * self.max_experts * self.max_banks + n * self.max_experts + n

    def _state(self) -> str | None:
        return None if self.phase is None else self.phase.state

    def _takes_inputs(self) -> bool:
        """Plain runs and checkpointed recomputes supply x; a checkpointed first run keeps nothing."""
        return self._state() != "first"

    def _watches_outputs(self) -> bool:
        """Plain runs and checkpointed first runs (whose graph the gradients flow through) hook y; routing load
        is counted there too, so a recompute does not count it twice."""
        return self._state() != "recompute"

    def _buffers(self, device: torch.device) -> None:
        if self.sq_norms is None:
            n = len(self.entries)
            self.sq_norms = torch.zeros(n, self.max_experts, self.max_banks, dtype=torch.float64, device=device)
            self.tokens = torch.zeros(n, self.max_experts, dtype=torch.float64, device=device)
            self.router_sq = torch.zeros(n, dtype=torch.float64, device=device)

    def _real_tokens(self, rows: int, device: torch.device) -> torch.Tensor | None:
        if self.token_mask is not None and self.token_mask.numel() == rows:
            return self.token_mask.reshape(-1).to(device=device, dtype=torch.bool)
        return None

    # ------------------------------------------------------------ measuring one expert
    def _rows(self, t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        t = t.detach()
        if keep is not None and drop_padding_here(t):
            t = t[keep]  # pad rows carry zero gradient: masking them only saves work (see hooks.py)
        return t.to(compute_dtype_for(t, self.compute_dtype))

    def _take(self, key: tuple, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        """The input of one bank of one expert (key ("bank", layer slot, expert, bank)) or of a router
        (("router", layer slot)); taken before the product runs, as a recompute may stop inside it."""
        if self._takes_inputs():
            self._arrive(key, x=self._rows(x, keep))

    def _watch(self, key: tuple, y: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Hook the output of the product `key` names: its gradient arrives in backward."""
        if self._watches_outputs():
            weight = self.batch_weight
            y.register_hook(lambda g: self._arrive(key, g=self._rows(g, keep), weight=weight))

    def _arrive(self, key: tuple, **parts) -> None:
        entry = self.arrive(key, **parts)  # the activation is freed as soon as its norm is taken
        if entry is not None:
            sq = entry["weight"] * weight_grad_sq_norm(entry["x"], entry["g"].to(entry["x"].dtype))
            if key[0] == "router":
                self.router_sq[key[1]] += sq
            else:
                self.sq_norms[key[1:]] += sq

    def _count(self, layer_slot: int, expert: int, token_idx: torch.Tensor, keep: torch.Tensor | None) -> None:
        if not self._watches_outputs():
            return
        count = token_idx.numel() if keep is None else keep.sum()
        self.tokens[layer_slot, expert] += self.batch_weight * count

    # ------------------------------------------------------------ replacement forwards
    def _hf_forward(self, layer_slot: int, block: MoeBlock, experts: nn.Module) -> Callable:
        """transformers' eager experts loop (see e.g. MixtralExperts.forward), measured per expert and bank."""
        banks = [b.name for b in block.banks]
        first = "gate_up_proj" if "gate_up_proj" in banks else "up_proj"
        has_gate = bool(getattr(experts, "has_gate", first == "gate_up_proj"))
        has_bias = bool(getattr(experts, "has_bias", False))
        transposed = bool(getattr(experts, "is_transposed", False))
        slot_first, slot_down = banks.index(first), banks.index("down_proj")

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            final = torch.zeros_like(hidden_states)
            measuring = torch.is_grad_enabled() and hidden_states.requires_grad
            if measuring:
                self._buffers(hidden_states.device)
            real = self._real_tokens(hidden_states.shape[0], hidden_states.device) if measuring else None
            first_bank, down_bank = getattr(experts, first), experts.down_proj
            for expert in range(block.num_experts):
                token_idx, k_pos = torch.where(top_k_index == expert)
                if token_idx.numel() == 0:
                    continue
                x = hidden_states[token_idx]
                keep = None if real is None else real[token_idx]
                key_first, key_down = ("bank", layer_slot, expert, slot_first), ("bank", layer_slot, expert, slot_down)
                if measuring:
                    self._take(key_first, x, keep)
                first_bias = getattr(experts, f"{first}_bias")[expert] if has_bias else None
                up = _bank_linear(x, first_bank[expert], first_bias, transposed)
                act = experts._apply_gate(up) if has_gate else experts.act_fn(up)
                if measuring:
                    self._watch(key_first, up, keep)
                    self._take(key_down, act, keep)
                down_bias = experts.down_proj_bias[expert] if has_bias else None
                out = _bank_linear(act, down_bank[expert], down_bias, transposed)
                if measuring:
                    self._watch(key_down, out, keep)
                    self._count(layer_slot, expert, token_idx, keep)
                out = out * top_k_weights[token_idx, k_pos, None]
                final.index_add_(0, token_idx, out.to(final.dtype))
            return final

        return forward

    def _megablocks_forward(self, layer_slot: int, block: MoeBlock, experts: nn.Module) -> Callable:
        """megablocks ParallelDroplessMLP.forward (grouped GLU/MLP + scatter), as a per-expert loop."""
        banks = [b.name for b in block.banks]
        mlp, args = experts.mlp, experts.args
        glu = "v1" in banks

        def forward(x: torch.Tensor, scores: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor):
            in_shape = x.shape
            tokens = x.reshape(-1, x.shape[-1])
            final = torch.zeros_like(tokens)
            measuring = torch.is_grad_enabled() and tokens.requires_grad
            if measuring:
                self._buffers(tokens.device)
            real = self._real_tokens(tokens.shape[0], tokens.device) if measuring else None
            n = block.num_experts
            w1 = mlp.w1.view(n, -1, tokens.shape[-1])
            w2 = mlp.w2.view(n, -1, tokens.shape[-1])
            v1 = mlp.v1.view(n, -1, tokens.shape[-1]) if glu else None
            weights = expert_weights.reshape(tokens.shape[0], -1)
            chosen = top_experts.reshape(tokens.shape[0], -1)
            for expert in range(n):
                token_idx, k_pos = torch.where(chosen == expert)
                if token_idx.numel() == 0:
                    continue
                xe = tokens[token_idx]
                keep = None if real is None else real[token_idx]
                key = {bank: ("bank", layer_slot, expert, banks.index(bank)) for bank in banks}
                if measuring:
                    self._take(key["w1"], xe, keep)
                    if glu:
                        self._take(key["v1"], xe, keep)
                h1 = xe @ w1[expert].t()
                act = args.activation_fn(h1)
                hv = None
                if glu:
                    hv = xe @ v1[expert].t()
                    act = act * hv
                if measuring:
                    self._watch(key["w1"], h1, keep)
                    if glu:
                        self._watch(key["v1"], hv, keep)
                    self._take(key["w2"], act, keep)
                out = act @ w2[expert]
                if measuring:
                    self._watch(key["w2"], out, keep)
                    self._count(layer_slot, expert, token_idx, keep)
                final.index_add_(0, token_idx, (out * weights[token_idx, k_pos, None]).to(final.dtype))
            final = final.view(in_shape)
            if experts.bias is not None:
                return (final, experts.bias) if args.return_bias else final + experts.bias
            return final

        return forward

    def _router_hooks(self, layer_slot: int) -> tuple[Callable, Callable]:
        """(pre-hook taking the router's input, hook watching its logits); tokens flattened, pads dropped."""
        key = ("router", layer_slot)

        def take(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad and self._takes_inputs():
                self._buffers(x.device)
                self._arrive(key, x=flat_tokens(x.detach(), self.token_mask, self.compute_dtype))

        def watch(module: nn.Module, inputs: tuple, output) -> None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if (
                torch.is_grad_enabled()
                and isinstance(logits, torch.Tensor)
                and logits.requires_grad
                and self._watches_outputs()
            ):
                self._buffers(logits.device)
                weight = self.batch_weight
                logits.register_hook(
                    lambda g: self._arrive(
                        key, g=flat_tokens(g.detach(), self.token_mask, self.compute_dtype), weight=weight
                    )
                )

        return take, watch

    @contextlib.contextmanager
    def attached(self) -> Iterator["ExpertProbe"]:
        swapped: list[PatchedForward] = []
        handles = []
        try:
            for slot, (_, block, layer) in enumerate(self.entries):
                experts = layer.get_submodule(block.experts_path)
                make = self._megablocks_forward if block.style == "megablocks" else self._hf_forward
                # the per-expert loop replaces the fused forward outright; it calls the banks itself
                swapped.append(patched_forward(experts, lambda _fused_forward: make(slot, block, experts)))
                router = layer.get_submodule(block.router_path)
                take, watch = self._router_hooks(slot)
                handles += [router.register_forward_pre_hook(take), router.register_forward_hook(watch)]
            yield self
        finally:
            for patch in reversed(swapped):
                patch.restore()
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------ results
    def local(self, device: torch.device | None = None) -> torch.Tensor:
        if self.sq_norms is None:
            return torch.zeros(self.size, dtype=torch.float64, device=device)
        parts = [self.sq_norms.flatten(), self.tokens.flatten(), self.router_sq]
        return torch.cat([p.to(device) if device is not None else p for p in parts])

    def scores(self, totals: torch.Tensor, batches: int) -> tuple[list[ExpertScore], dict[int, float]]:
        """Summed (all-reduced) flat tensor -> expert scores and router scores, per the report's definition."""
        n, e, b = len(self.entries), self.max_experts, self.max_banks
        totals = totals.double().cpu()
        sq = totals[: n * e * b].view(n, e, b)
        tokens = totals[n * e * b : n * e * b + n * e].view(n, e)
        router = totals[n * e * b + n * e :]
        experts, routers = [], {}
        for slot, (layer, block, _) in enumerate(self.entries):
            routers[layer] = math.sqrt(max(float(router[slot]), 0.0) / batches)
            for expert in range(block.num_experts):
                banks = {
                    bank.name: math.sqrt(max(float(sq[slot, expert, i]), 0.0) / batches)
                    for i, bank in enumerate(block.banks)
                }
                experts.append(
                    ExpertScore(
                        layer=layer,
                        expert=expert,
                        score=math.sqrt(sum(s * s for s in banks.values())),
                        tokens=int(round(float(tokens[slot, expert]))),
                        banks=banks,
                    )
                )
        return experts, routers
