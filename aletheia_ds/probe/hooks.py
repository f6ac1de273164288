"""Per-module squared Frobenius norm of dL/dW from activations and output gradients, no weight gradients.

For a linear y = x W^T, dL/dW = g^T x summed over tokens, with g = dL/dy. The forward hook keeps x, a
hook on y receives g during backward, and the squared norm is computed there and x is freed. W never
gets `.grad` and no full-size gradient is kept: the product is formed in row blocks, or through the
token Gram matrices when there are fewer tokens than weight entries:
    ||g^T x||_F^2 = sum_{s,t} (g_s . g_t)(x_s . x_t)

Signal and noise (`sketch_dim` k > 0). Raw ||G_b||^2 mixes the gradient every batch agrees on with batch
noise, and noise dominates where scores are largest for reasons unrelated to adaptation. Each batch's
G_b = g^T x is sketched as s_b = G_b Omega = g^T (x Omega), Omega (d_in x k) Gaussian with variance 1/k and
the same on every rank (seeded by d_in), so E[<s_b, s_b'>] = <G_b, G_b'>. Summed over batches,
    ||mean_b G_b||^2 ~ (||sum_b s_b||^2 - sum_b ||s_b||^2) / (B (B - 1))
uses only the cross-batch products: the noise of each batch drops out (the unbiased estimator of the squared
norm of the mean). The sketch of the mean also gives its spectrum, i.e. the share of the signal a rank-r
adapter can capture (randomised range finding, Halko et al. 2011). Cost: two (tokens x k) products per module
and batch, d_out x k floats per module kept.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

BLOCK_ELEMENTS = 1 << 24  # ~64 MB of float32 per block of the product / Gram matrix
SKETCH_SEED = 20_260_415  # Omega must be identical on every rank and in every run


def sketch_matrix(d_in: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Omega (d_in x k), entries N(0, 1/k), a function of (d_in, k) alone: every rank draws the same one."""
    generator = torch.Generator().manual_seed(SKETCH_SEED + 7919 * d_in + k)
    return (torch.randn(d_in, k, generator=generator, dtype=torch.float32) / k**0.5).to(device)


def sketch_product(x: torch.Tensor, g: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """s = g^T (x Omega) in float32, for x: (tokens, in), g: (tokens, out)."""
    projected = x @ omega.to(x.dtype)
    return (g.T @ projected.to(g.dtype)).float()


def weight_grad_sq_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g^T x||_F^2 for x: (tokens, in), g: (tokens, out); float64 scalar, computed in blocks."""
    tokens, d_in = x.shape
    d_out = g.shape[1]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if tokens == 0:
        return total
    if tokens * (d_in + d_out) < d_in * d_out:
        # Gram route: fewer multiply-adds and a (tokens x tokens) block instead of (out x in)
        rows = max(1, BLOCK_ELEMENTS // tokens)
        for start in range(0, tokens, rows):
            gram_x = x[start : start + rows] @ x.T
            gram_g = g[start : start + rows] @ g.T
            total += (gram_x.double() * gram_g.double()).sum()
        return total
    rows = max(1, BLOCK_ELEMENTS // d_in)
    for start in range(0, d_out, rows):
        block = g[:, start : start + rows].T @ x
        # squared norm accumulated in float32 or wider without a float64 copy of the block
        total += (
            torch.linalg.vector_norm(block, dtype=torch.float64 if block.dtype == torch.float64 else torch.float32)
            .double()
            .square()
        )
    return total


def weight_grad_inner_over_slices(x: torch.Tensor, g: torch.Tensor, slices) -> torch.Tensor:
    """<g_r^T x_r, G> for this rank's token slice r of sequences whose other slices the rest of the group holds,
    G = sum_q g_q^T x_q; summed over the group it is ||G||_F^2 (what weight_grad_sq_norm gives on one rank).

    `slices` (sequence_parallel.TokenSlices) gathers or sums across the group; every rank holds the same number
    of tokens, so every rank takes the same route: the gathered tokens' Gram products with this rank's rows, or
    this rank's product block against the group's all-reduced one, whichever moves fewer numbers.
    """
    tokens, d_in = x.shape
    d_out = g.shape[1]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if tokens * slices.size * (d_in + d_out) < d_in * d_out:
        x_all, g_all = slices.gather(x), slices.gather(g)
        rows = max(1, BLOCK_ELEMENTS // x_all.shape[0])
        for start in range(0, tokens, rows):
            gram_x = x[start : start + rows] @ x_all.T
            gram_g = g[start : start + rows] @ g_all.T
            total += (gram_x.double() * gram_g.double()).sum()
        return total
    rows = max(1, BLOCK_ELEMENTS // d_in)
    for start in range(0, d_out, rows):
        block = g[:, start : start + rows].T @ x
        total += torch.sum(block * slices.sum(block), dtype=torch.float64)
    return total


def compute_dtype_for(t: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """Half-precision products on CPU are slow and inexact: measure in float32 there unless told otherwise."""
    return compute_dtype or (
        torch.float32 if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu" else t.dtype
    )


def drop_padding_here(t: torch.Tensor) -> bool:
    """Padded rows have exactly zero output gradient (right padding, causal attention), so dropping them only
    saves work; on a GPU the boolean index would cost a host sync per module, so they are kept there."""
    return t.device.type == "cpu"


def flat_tokens(t: torch.Tensor, token_mask: torch.Tensor | None, compute_dtype: torch.dtype | None = None):
    """(..., features) -> (tokens, features), padded positions dropped on CPU when the mask matches."""
    t = t.reshape(-1, t.shape[-1])
    if token_mask is not None and token_mask.numel() == t.shape[0] and drop_padding_here(t):
        t = t[token_mask.reshape(-1).to(t.device)]
    return t.to(compute_dtype_for(t, compute_dtype))


class CheckpointPhase:
    """Which run of a non-reentrant checkpointed forward is under way: the first one ("first", activations
    not kept) or its recompute during backward ("recompute"); None outside checkpointed regions.

    `checkpoint_kwargs()` go to `model.gradient_checkpointing_enable`: torch's `context_fn` enters one of
    these phases around each run, which lets the hooks keep one layer's activations at a time while ZeRO-3
    releases each layer's gathered weights after its backward (with reentrant checkpointing it does not).
    """

    def __init__(self) -> None:
        self.state: str | None = None

    @contextlib.contextmanager
    def _entered(self, state: str) -> Iterator[None]:
        previous, self.state = self.state, state
        try:
            yield
        finally:
            self.state = previous

    def checkpoint_kwargs(self) -> dict:
        return {"use_reentrant": False, "context_fn": lambda: (self._entered("first"), self._entered("recompute"))}


class Rendezvous:
    """Where a product's input x and its output gradient g meet when they come from different runs (under
    CheckpointPhase: g from the first run's graph, x from the recompute), in either order."""

    def __init__(self) -> None:
        self.pending: dict = {}
        self.max_pending = 0

    def arrive(self, key, **parts) -> dict | None:
        """Add parts to key's entry; once it holds both "x" and "g" it is removed and returned."""
        entry = self.pending.setdefault(key, {})
        entry.update(parts)
        self.max_pending = max(self.max_pending, len(self.pending))
        if "x" in entry and "g" in entry:
            return self.pending.pop(key)
        return None


class GradNormHooks(Rendezvous):
    """Accumulates, per named linear, sum over batches of ||dL_b/dW||_F^2 (times a batch weight).

    `token_mask` (set per batch) drops padded positions before the products: they carry no gradient,
    and skipping them saves work. Activations are kept only while grad is enabled, so a reentrant
    checkpointed forward (run under no_grad, recomputed in backward) is measured on its recompute.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        compute_dtype: torch.dtype | None = None,
        phase: CheckpointPhase | None = None,
        sketch_dim: int = 0,
        token_slices=None,
    ):
        self.modules = modules
        self.token_slices = token_slices  # sequence parallelism: this rank holds a slice of every sequence
        self.sketch_dim = sketch_dim
        self.sketch_sums: list[torch.Tensor | None] = [None] * len(modules)  # sum_b s_b per module
        self.sketch_sq: torch.Tensor | None = None  # sum_b ||s_b||^2 per module
        self._omegas: dict[tuple, torch.Tensor] = {}
        super().__init__()  # checkpointed modules: input and output gradient meet during the layer's backward
        self.phase = phase or CheckpointPhase()
        self.names = list(modules)
        self.compute_dtype = compute_dtype
        self.sq_norms: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.batch_weight = 1.0
        self.calls = torch.zeros(len(self.names), dtype=torch.long)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return flat_tokens(t, self.token_mask, self.compute_dtype)

    def _forward_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if self.phase.state == "recompute":
                return  # the input was taken by the pre-hook
            if self.phase.state == "first":
                weight = self.batch_weight
                output.register_hook(lambda g: self._arrive(index, g=self._flat(g.detach()), weight=weight))
                return
            x = self._flat(inputs[0].detach())
            weight = self.batch_weight

            def grad_hook(g: torch.Tensor) -> None:
                nonlocal x
                self._measure(index, weight, x, self._flat(g.detach()))
                x = None  # free the activation as soon as its norm is taken

            output.register_hook(grad_hook)

        return hook

    def _recompute_pre_hook(self, index: int) -> Callable:
        """The recompute may stop inside the layer's last linear, once it has what backward needs (torch's
        early stop, which ZeRO-3's weight release relies on): take the input before the module runs."""

        def hook(module: nn.Module, inputs: tuple) -> None:
            if (
                self.phase.state == "recompute"
                and torch.is_grad_enabled()
                and isinstance(inputs[0], torch.Tensor)
                and inputs[0].requires_grad
            ):
                self._arrive(index, x=self._flat(inputs[0].detach()))

        return hook

    def _measure(self, index: int, weight: float, x: torch.Tensor, g: torch.Tensor) -> None:
        slices = self.token_slices
        sq = weight_grad_sq_norm(x, g) if slices is None else weight_grad_inner_over_slices(x, g, slices)
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(len(self.names), dtype=torch.float64, device=sq.device)
            self.sketch_sq = torch.zeros(len(self.names), dtype=torch.float64, device=sq.device)
        self.sq_norms[index] += weight * sq
        self.calls[index] += 1
        if self.sketch_dim and weight:
            sketch = sketch_product(x, g, self._omega(x.shape[1], x.device))
            total = self.sketch_sums[index]
            self.sketch_sums[index] = sketch if total is None else total + sketch
            # the batch's sketch is the group's sum of slice sketches (linear in G): add <s_r, s> as for the norm
            whole = sketch if slices is None else slices.sum(sketch)
            self.sketch_sq[index] += (sketch.double() * whole.double()).sum()

    def _omega(self, d_in: int, device: torch.device) -> torch.Tensor:
        key = (d_in, str(device))
        if key not in self._omegas:
            self._omegas[key] = sketch_matrix(d_in, self.sketch_dim, device)
        return self._omegas[key]

    def sketches(self, device: torch.device) -> torch.Tensor:
        """Every module's sum of sketches, flattened and concatenated in module order (zeros where a module saw
        no batch), then the per-module sums of squared sketch norms: one tensor for one all-reduce."""
        parts = []
        for index, module in enumerate(self.modules.values()):
            total = self.sketch_sums[index]
            parts.append(
                total.reshape(-1).double()
                if total is not None
                else torch.zeros(module.out_features * self.sketch_dim, dtype=torch.float64, device=device)
            )
        sq = self.sketch_sq if self.sketch_sq is not None else torch.zeros(len(self.names), dtype=torch.float64)
        return torch.cat([p.to(device) for p in parts] + [sq.to(device)])

    def _arrive(self, index: int, **parts) -> None:
        entry = self.arrive(index, **parts)
        if entry is not None:
            self._measure(index, entry["weight"], entry["x"], entry["g"])

    @contextlib.contextmanager
    def attached(self, input_embeddings: nn.Module | None = None) -> Iterator["GradNormHooks"]:
        """Register the hooks; make the embedding output require grad so every layer's output does.

        With frozen embeddings nothing upstream of layer 0 requires grad, and the first layer's
        outputs would carry no gradient at all.
        """
        handles = [m.register_forward_hook(self._forward_hook(i)) for i, m in enumerate(self.modules.values())]
        handles += [
            m.register_forward_pre_hook(self._recompute_pre_hook(i)) for i, m in enumerate(self.modules.values())
        ]
        if input_embeddings is not None:
            handles.append(
                input_embeddings.register_forward_hook(
                    lambda _m, _i, out: out.requires_grad_(True) if torch.is_grad_enabled() else out
                )
            )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def result(self) -> dict[str, float]:
        if self.sq_norms is None:
            return {name: 0.0 for name in self.names}
        return {name: float(v) for name, v in zip(self.names, self.sq_norms.cpu())}
