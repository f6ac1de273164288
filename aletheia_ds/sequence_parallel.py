"""Long context: DeepSpeed's Ulysses sequence parallelism (ALST) around a Hugging Face model.

train.sequence_parallel_size = sp > 1 splits every sequence over a group of sp ranks. DeepSpeed provides the
pieces and this module only wires them to the run (deepspeed.runtime.sequence_parallel.ulysses_sp):
  - UlyssesSPAttentionHF.register_with_transformers swaps the model's attention function for one that
    exchanges query/key/value all-to-all (sequence slices -> head slices) around the core attention and
    returns the `mpu` that deepspeed.initialize needs to reduce gradients over the group;
  - UlyssesSPDataLoaderAdapter gathers one batch from each rank of the group and hands every rank its slice
    of each (with labels shifted before slicing, `shift_labels`): a group of sp ranks runs sp shards per batch
    its ranks were given, so the step schedule stays over all ranks and DeepSpeed accumulates over
    train.grad_accum x sp micro-batches;
  - TiledFusedLogitsLoss forms logits and cross-entropy over the vocabulary a slice of tokens at a time,
    never holding the whole (tokens x vocabulary) logits;
  - TiledMLP (train.tiled_mlp) runs each dense MLP block a slice of tokens at a time and recomputes it in
    backward.

The loss of a rank is the sum of its tokens' losses divided by the sequence group's count of loss tokens;
the group's losses add up to the batch's mean token loss, and since every all-to-all's backward is its
transpose, the sum over the group of each rank's gradient is the gradient of that mean (DeepSpeed sums over
the sequence group and averages over the data-parallel groups).

The probe's norms need the whole sequence's gradient G = sum_r G_r of each linear: `TokenSlices` lets each
rank add <G_r, G> (a token-pair Gram over the gathered tokens, or the all-reduced product block), which
the probe's all-reduce then sums to ||G||^2, the non-parallel score.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from .arch import MLP_BLOCKS, Layout, get_submodule
from .config import ConfigError, RunConfig
from .data import IGNORE, shard_indices
from .execution import base_model, patched_forward

LOGITS_PER_SHARD = 1 << 27  # tokens x vocabulary entries of one loss tile (512 MiB of float32 logits)


def check_sequence_parallel(cfg: RunConfig, world_size: int, layout: Layout, model_config: Any) -> None:
    """What sequence parallelism cannot run is refused in one line before anything is attached."""
    sp = cfg.train.sequence_parallel_size
    if sp == 1:
        if cfg.train.tiled_mlp and layout.moe:
            raise ConfigError("train.tiled_mlp: applies to dense MLP blocks only; this model has MoE layers")
        return
    if world_size % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} must divide the number of ranks ({world_size})")
    if layout.moe:
        raise ConfigError(
            "train.sequence_parallel_size: not supported for MoE models (their routed tokens and expert probe "
            "assume whole sequences); set train.sequence_parallel_size=1"
        )
    impl = getattr(model_config, "_attn_implementation", None)
    if impl in (None, "eager"):
        raise ConfigError(
            f"model.attn_implementation: {impl or 'eager'} is not supported under sequence parallelism (it needs "
            "a full 4-D mask); set model.attn_implementation=sdpa or flash_attention_2"
        )
    text = model_config.get_text_config()
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", text.num_attention_heads)
    if heads % sp or (kv_heads % sp and sp % kv_heads):
        raise ConfigError(
            f"train.sequence_parallel_size={sp} must divide the {heads} attention heads, and the {kv_heads} key/value "
            "heads must divide it or be divisible by it; choose another size"
        )
    if cfg.probe.batch_size != cfg.train.micro_batch_size and not cfg.probe.report:
        raise ConfigError(
            f"probe.batch_size={cfg.probe.batch_size} must equal train.micro_batch_size="
            f"{cfg.train.micro_batch_size} under sequence parallelism (DeepSpeed's Ulysses attention is built for "
            "one batch size)"
        )
    if cfg.data.packing and "flash" not in impl:
        raise ConfigError(
            "data.packing: under sequence parallelism only flash attention keeps packed examples apart (DeepSpeed's "
            "Ulysses attention drops the mask and sdpa then sees one causal row); set "
            "model.attn_implementation=flash_attention_2 or data.packing=false"
        )
    if cfg.data.packing and cfg.train.micro_batch_size != 1:
        raise ConfigError(
            "data.packing: under sequence parallelism packed rows go one per micro-batch (flash attention reads the "
            "examples from one row's position ids); set train.micro_batch_size=1 and probe.batch_size=1"
        )
    if cfg.train.prefix_cache:
        raise ConfigError("train.prefix_cache: not supported under sequence parallelism; set one of them off")
    if cfg.train.compile:
        raise ConfigError("train.compile: not supported under sequence parallelism; set train.compile=false")


@dataclass
class TokenSlices:
    """The probe's view of a sequence group: every rank holds a slice of the same sequences' tokens.
    `gather(t)` concatenates the group's (tokens, features) slices in rank order; `sum(t)` all-reduces."""

    size: int
    gather: Callable[[torch.Tensor], torch.Tensor]
    sum: Callable[[torch.Tensor], torch.Tensor]


class SequenceParallel:
    """A registered Ulysses group of `size` ranks; `rank` is this rank's place in it."""

    def __init__(self, mpu, attn_implementation: str, core_attention, micro_batch_size: int, pad_id: int, device):
        self.mpu = mpu
        self.group = mpu.get_sequence_parallel_group()
        self.size = mpu.get_sequence_parallel_world_size()
        self.rank = mpu.get_sequence_parallel_rank()
        self.attn_implementation = attn_implementation
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.device = device
        self._core_attention = core_attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._ulysses_attention = ALL_ATTENTION_FUNCTIONS[attn_implementation]

    @classmethod
    def register(cls, model: nn.Module, size: int, micro_batch_size: int, pad_id: int, device) -> "SequenceParallel":
        """DeepSpeed's Ulysses attention in place of the model's attention implementation (process-wide)."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = model.config._attn_implementation
        core = ALL_ATTENTION_FUNCTIONS[impl]
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=impl,
            sequence_parallel_size=size,
            micro_batch_size=micro_batch_size,
            seq_length_is_variable=True,  # batches are padded to their longest example, not to data.seq_len
        )
        return cls(mpu, impl, core, micro_batch_size, pad_id, device)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Whole sequences on every rank inside the block (the adapter's sample logits)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[self.attn_implementation] = self._core_attention
        try:
            yield
        finally:
            ALL_ATTENTION_FUNCTIONS[self.attn_implementation] = self._ulysses_attention

    # ------------------------------------------------------------ data
    def _fit(self, batch: dict, width_to: int) -> dict:
        """A collated batch as Ulysses needs it: exactly micro_batch_size rows (rows of padding added: no loss
        token, no gradient), `width_to` columns (a multiple of the group size), and position ids."""
        batch = dict(batch)
        rows, width = batch["input_ids"].shape
        extra_rows, extra_cols = self.micro_batch_size - rows, width_to - width
        if extra_rows < 0:
            raise ValueError(f"batch of {rows} rows; Ulysses attention was built for {self.micro_batch_size}")
        packed = "position_ids" in batch
        if not packed:
            batch["position_ids"] = torch.arange(width).expand(rows, width).clone()
        fill = {"input_ids": self.pad_id, "labels": IGNORE, "attention_mask": 0}
        for key, value in list(batch.items()):
            if not torch.is_tensor(value):
                continue
            if key == "position_ids":  # added columns continue a row, or restart as a block of their own if packed
                tail = torch.arange(extra_cols) + (0 if packed else width)
                value = torch.cat([value, tail.expand(rows, extra_cols).to(value.dtype)], dim=1)
                value = torch.cat([value, torch.arange(width + extra_cols).expand(extra_rows, -1)], dim=0)
            else:
                value = nn.functional.pad(value, (0, extra_cols, 0, extra_rows), value=fill.get(key, 0))
            batch[key] = value
        return batch

    def shards(self, batches: Iterable[dict]) -> Iterator[dict]:
        """This rank's slices of the group's batches, one batch of the group at a time (every rank of the group
        must pass the same number of batches). Non-tensor entries (a probe batch's weight) travel along."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        batches = list(batches)
        # one width for the group: gloo's all-gather, which the adapter uses, takes equal shapes only
        width = torch.tensor([max((b["input_ids"].shape[1] for b in batches), default=0)], device=self.device)
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX, group=self.group)
        width_to = math.ceil(int(width) / self.size) * self.size
        adapter = UlyssesSPDataLoaderAdapter(
            [self._fit(b, width_to) for b in batches],
            sp_rank=self.rank,
            sp_group=self.group,
            sp_world_size=self.size,
            device=self.device,
        )
        return iter(adapter)

    # ------------------------------------------------------------ loss
    def loss(self, forward: Callable[..., Any], model: nn.Module, shard: dict) -> torch.Tensor:
        """This rank's share of the batch's mean token loss: its tokens' summed loss over the group's count."""
        summed, count = self.summed_loss(forward, model, shard)
        return summed / count.clamp(min=1).to(summed.dtype)

    def summed_loss(self, forward: Callable[..., Any], model: nn.Module, shard: dict) -> tuple[torch.Tensor, ...]:
        """(this rank's summed token loss, the group's number of loss tokens).

        `forward` runs the (PEFT-wrapped, engine-wrapped) model, keeping one logit per row; the final norm's
        output is taken by a hook and the logits and loss are formed in tiles by DeepSpeed's
        TiledFusedLogitsLoss (each tile's backward runs inside it, so only one tile of logits exists at a time).
        """
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        inner = base_model(model)
        head = inner.get_output_embeddings()
        captured = []
        handle = _final_norm(inner).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            forward(
                input_ids=shard["input_ids"].to(self.device),
                position_ids=shard["position_ids"].to(self.device),
                use_cache=False,
                logits_to_keep=1,
            )
        finally:
            handle.remove()
        labels = shard["shift_labels"].to(self.device)
        tiles = max(1, math.ceil(labels.numel() * head.out_features / LOGITS_PER_SHARD))

        def tile_loss(head_module, x, y):
            logits = head_module(x).float()
            return nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")

        summed = TiledFusedLogitsLoss.apply(tile_loss, head, captured[-1], labels, None, tiles, [head.weight], "sum")
        return summed, self.group_sum((labels != IGNORE).sum().to(torch.float32))

    @torch.no_grad()
    def held_out_loss(self, forward, batches: list[dict], rank: int, world_size: int, all_reduce_sum) -> float:
        """evaluate.held_out_loss under sequence parallelism: the token-weighted mean loss of `batches`."""
        totals = torch.zeros(2, dtype=torch.float64)
        share = [
            {**batches[0 if index is None else index], "weight": 0.0 if index is None else 1.0}
            for index in shard_indices(len(batches), rank, world_size)
        ]
        for shard in self.shards(share):
            summed, count = self.summed_loss(forward, forward.module, shard)
            # the group's count is added once per group (its first rank), the slices' sums by every rank
            totals += shard["weight"] * torch.tensor([float(summed), float(count) * (self.rank == 0)])
        totals = all_reduce_sum(totals)
        return float(totals[0] / totals[1])

    def group_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.clone()
        torch.distributed.all_reduce(work, group=self.group)
        return work

    def token_slices(self) -> TokenSlices:
        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=self.group)
            return torch.cat(parts, dim=0)

        return TokenSlices(size=self.size, gather=gather, sum=self.group_sum)


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (`model.norm` for every supported family)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model.model
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        found = getattr(backbone, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ConfigError(f"train.sequence_parallel_size: cannot find the final norm of {type(model).__name__}")


def tile_mlps(model: nn.Module, layout: Layout) -> int:
    """train.tiled_mlp: every dense MLP block runs through DeepSpeed's TiledMLP, ceil(tokens / hidden_size)
    slices of the sequence at a time (its intermediate activations exist for one slice), recomputed in
    backward. Kept for the process's life, as the adapters are. Returns the number of blocks tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    layers = get_submodule(base_model(model), layout.layers_path)
    tiled = 0
    for layer in layers:
        block = next((getattr(layer, name) for name in MLP_BLOCKS if isinstance(getattr(layer, name, None), nn.Module)))
        trainable = [p for p in block.parameters() if p.requires_grad]

        def wrap(forward, trainable=trainable):
            @functools.wraps(forward)
            def run(x):
                slices = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
                return TiledMLP.apply(lambda _self, part: forward(part), None, x, slices, trainable)

            return run

        patched_forward(block, wrap)
        tiled += 1
    return tiled


def sp_setup(ctx, cfg: RunConfig, model: nn.Module, layout: Layout, pad_id: int) -> Optional[SequenceParallel]:
    """Checks, then registers the Ulysses group when train.sequence_parallel_size > 1 (None otherwise)."""
    check_sequence_parallel(cfg, ctx.world_size, layout, model.config)
    if cfg.train.sequence_parallel_size == 1:
        return None
    return SequenceParallel.register(
        model, cfg.train.sequence_parallel_size, cfg.train.micro_batch_size, pad_id, ctx.device
    )
