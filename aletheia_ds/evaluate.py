"""Held-out loss: token-weighted mean next-token loss over batches, reduced across ranks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .data import IGNORE, shard_indices


def predicted_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def held_out_loss(forward: Callable[[dict], torch.Tensor], batches: Sequence[dict], *, rank: int = 0,
                  world_size: int = 1, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> float:
    """`forward(batch)` returns the model's mean token loss; batches are dealt round-robin over ranks."""
    if not batches:
        return float("nan")
    totals = torch.zeros(2, dtype=torch.float64)
    for index in shard_indices(len(batches), rank, world_size):
        batch = batches[0 if index is None else index]
        loss = forward(batch)  # every rank runs the pass: ZeRO-3 gathers collectively
        if index is not None:
            count = predicted_tokens(batch)
            totals += torch.tensor([float(loss) * count, count], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    return float(totals[0] / totals[1])
