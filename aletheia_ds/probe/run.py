"""Batches in, ProbeReport out: one forward and one backward per probe batch, hooks measure the norms.

Distributed use passes `rank`, `world_size` and `all_reduce_sum`; this module never imports
torch.distributed. Batches are dealt round-robin; every rank runs the same number of passes (ZeRO-3
gathers parameters collectively), the surplus passes weighted 0.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..arch import Layout, get_submodule
from ..data import shard_indices
from .experts import ExpertProbe
from .hooks import CheckpointPhase, GradNormHooks
from .report import ProbeReport

Batch = dict[str, torch.Tensor]
WEIGHT = "probe_weight"  # 0 for the surplus passes that keep every rank's pass count equal


def run_probe(
    model: nn.Module,
    layout: Layout,
    batches: Sequence[Batch],
    forward: Callable[[Batch], torch.Tensor],
    *,
    model_name: str = "",
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    compute_dtype: torch.dtype | None = None,
    checkpointing: bool = False,
    on_batch: Callable[[int], None] | None = None,
    sketch_dim: int = 0,
    shard: Callable[[Iterable[Batch]], Iterable[Batch]] | None = None,
    token_slices=None,
) -> ProbeReport:
    """Probe `model` (frozen) on `batches`; `forward(batch)` returns the model's mean token loss.

    `checkpointing`: non-reentrant activation checkpointing of the decoder layers for the probe, so that one
    layer's activations (and under ZeRO-3 one layer's gathered weights) are alive at a time.
    `on_batch(tokens)` is called after each pass of this rank (tokens 0 for a surplus pass): progress display.
    `sketch_dim` > 0: also the signal/noise split, low-rank share and weight norms of every module
    (probe/hooks.py explains the sketch; ProbeReport.add_sketch_stats the scores).
    Sequence parallelism: `shard` turns this rank's batches into its slices of its group's batches (a batch's
    "probe_weight" travels with it) and `token_slices` (sequence_parallel.TokenSlices) lets the hooks form
    each module's whole-sequence norm from the slices.
    """
    if not batches:
        raise ValueError("probe needs at least one batch")
    entries = [(layer, target.key, module) for layer, target, module in layout.iter_modules(model)]
    keys = [(layer, key) for layer, key, _ in entries]
    modules = {f"{layer}:{key}": module for layer, key, module in entries}
    phase = CheckpointPhase()
    hooks = GradNormHooks(
        modules, compute_dtype=compute_dtype, phase=phase, sketch_dim=sketch_dim, token_slices=token_slices
    )
    experts = ExpertProbe(model, layout, compute_dtype=compute_dtype, phase=phase)  # no-op for dense models
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=phase.checkpoint_kwargs())
    was_training = model.training
    model.eval()  # dropout off: the score is a property of the model and the data, not of a dropout draw
    # ...but a decoder layer checkpoints only in training mode (transformers' GradientCheckpointingLayer
    # reads its own flag): the layers alone say "training" so that a checkpointed probe keeps one layer's
    # activations instead of the whole model's; their children (attention, dropout) stay in eval mode
    for layer in get_submodule(model, layout.layers_path):
        layer.training = True
    start = time.perf_counter()
    tokens = 0
    with hooks.attached(model.get_input_embeddings()), experts.attached():
        share = [
            {**batches[0 if index is None else index], WEIGHT: 0.0 if index is None else 1.0}
            for index in shard_indices(len(batches), rank, world_size)
        ]
        for batch in shard(share) if shard is not None else share:
            weight = batch.pop(WEIGHT)
            # a slice's padding is not dropped: every rank of a sequence group must hold as many tokens
            mask = batch["attention_mask"].bool() if "attention_mask" in batch and token_slices is None else None
            hooks.token_mask = experts.token_mask = mask
            hooks.batch_weight = experts.batch_weight = weight
            loss = forward(batch)
            loss.backward()
            if hooks.pending or experts.pending:
                raise RuntimeError(
                    f"probe: no recompute reached modules {sorted(hooks.pending)} / experts "
                    f"{sorted(experts.pending)[:8]} (a checkpointed layer whose forward was not "
                    "run again in backward, or an output that got no gradient)"
                )
            batch_tokens = 0
            if weight:
                batch_tokens = (
                    int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                )
                tokens += batch_tokens
            if on_batch is not None:
                on_batch(batch_tokens)
    model.train(was_training)
    if checkpointing:
        model.gradient_checkpointing_disable()
    local = hooks.sq_norms if hooks.sq_norms is not None else torch.zeros(len(modules), dtype=torch.float64)
    device = local.device
    # one all-reduce for everything: module norms, expert norms/loads/router norms, tokens
    totals = all_reduce_sum(
        torch.cat([local, experts.local(device), torch.tensor([float(tokens)], dtype=torch.float64, device=device)])
    )
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    seconds = float(all_reduce_sum(seconds)) / world_size
    sums = {key: float(v) for key, v in zip(keys, totals[: len(keys)].cpu())}
    report = ProbeReport.from_sq_norms(
        sums,
        batches=len(batches),
        num_layers=layout.num_layers,
        model=model_name,
        tokens=int(totals[-1]),
        seconds=seconds,
        layout=layout.to_json(),
        world_size=world_size,
        batch_size=int(batches[0]["input_ids"].shape[0]),
        seq_len=max(int(b["input_ids"].shape[1]) for b in batches),
    )
    if experts.entries:
        report.add_experts(*experts.scores(totals[len(keys) : -1], len(batches)))
    if sketch_dim:
        sketches = all_reduce_sum(hooks.sketches(device))
        weights = all_reduce_sum(local_weight_sq_norms(list(modules.values()), rank, device))
        report.add_sketch_stats(sketch_stats(keys, list(modules.values()), sketches, weights, len(batches), sketch_dim))
    return report


def local_weight_sq_norms(modules: list[nn.Module], rank: int, device: torch.device) -> torch.Tensor:
    """This rank's share of each module's ||W||_F^2: its ZeRO-3 partition (`ds_tensor`; the padding is zero),
    or the whole weight on rank 0 when weights are not partitioned, so that the sum over ranks is ||W||^2."""
    out = torch.zeros(len(modules), dtype=torch.float64, device=device)
    for index, module in enumerate(modules):
        weight = module.weight
        held = getattr(weight, "ds_tensor", None)
        if held is not None:
            out[index] = held.detach().double().square().sum().to(device)
        elif rank == 0:
            out[index] = weight.detach().double().square().sum().to(device)
    return out


LOWRANK_R = 16  # the rank whose capturable share `lowrank` reports (the uniform baseline's)


def sketch_stats(
    keys: list[tuple[int, str]],
    modules: list[nn.Module],
    sketches: torch.Tensor,
    weight_sq: torch.Tensor,
    batches: int,
    k: int,
) -> dict[tuple[int, str], dict]:
    """Per module: signal = sqrt of the unbiased ||mean_b G_b||^2 (clamped at 0), lowrank = signal x the share of
    the mean sketch's energy in its top LOWRANK_R singular values, weight = ||W||_F."""
    stats, offset = {}, 0
    tail = sketches[-len(keys) :]
    for index, (key, module) in enumerate(zip(keys, modules)):
        size = module.out_features * k
        total = sketches[offset : offset + size].reshape(module.out_features, k)
        offset += size
        total_sq, per_batch_sq = float(total.square().sum()), float(tail[index])
        if batches > 1:
            signal_sq = max(0.0, (total_sq - per_batch_sq) / (batches * (batches - 1)))
        else:
            signal_sq = total_sq  # one batch: no noise estimate, the whole gradient counts
        singular = torch.linalg.svdvals(total.float().cpu()).double().square()
        share = float(singular[:LOWRANK_R].sum() / singular.sum()) if float(singular.sum()) > 0 else 0.0
        stats[key] = {
            "signal": signal_sq**0.5,
            "lowrank": (signal_sq * share) ** 0.5,
            "weight": float(weight_sq[index]) ** 0.5,
        }
    return stats
