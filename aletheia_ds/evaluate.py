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


def evaluate_adapter(model: str, adapter: str, data: str, tokenizer: str | None = None, seq_len: int = 1024,
                     batches: int = 8, batch_size: int = 4, verify_logits: str | None = None,
                     random_init: bool = False) -> dict:
    """Reload base + adapter with plain PEFT (as any user would) and score them on held-out data."""
    import contextlib
    from pathlib import Path

    from peft import PeftModel

    from .checkpoint import load_safetensors
    from .config import ConfigError, ModelSection
    from .data import fixed_batches, load_examples, load_tokenizer
    from .model import load_model

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter!r} has no adapter_config.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(tokenizer or model)
    examples = load_examples(data, tok, seq_len)
    eval_batches = fixed_batches(examples, batch_size, batches, tok.pad_token_id)
    base = load_model(ModelSection(path=model, random_init=random_init, dtype="float32"), torch.float32, device,
                      contextlib.nullcontext)

    def forward_with(net):
        return lambda batch: net(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss

    result = {"base_loss": held_out_loss(forward_with(base), eval_batches)}
    tuned = PeftModel.from_pretrained(base, adapter).to(device).eval()
    from .expert_lora import load_expert_adapter

    load_expert_adapter(tuned, adapter)  # per-expert LoRA of megablocks banks, when the adapter has one
    empty = [n for n, p in tuned.named_parameters() if "lora_" in n and p.numel() == 0]
    if empty:
        raise ConfigError(f"--adapter: {len(empty)} empty LoRA tensors (first: {empty[0]})")
    result["adapter_loss"] = held_out_loss(forward_with(tuned), eval_batches)
    if verify_logits:
        saved = load_safetensors(verify_logits)
        with torch.no_grad():
            logits = tuned(input_ids=saved["input_ids"].to(device), attention_mask=saved["attention_mask"].to(device),
                           use_cache=False).logits.float().cpu()
        mask = saved["attention_mask"].bool()
        diff = (logits - saved["logits"])[mask].abs()
        scale = saved["logits"][mask].abs().max()
        result["logits_max_abs_diff"] = float(diff.max())
        result["logits_match"] = bool(diff.max() <= 1e-4 * max(1.0, float(scale)))
    return result
