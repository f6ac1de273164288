"""The study's base models: Llama-shaped LMs pretrained from scratch on the corpus stream, saved in the cache.

Each base trains in its own process (the stage runs them side by side on the one GPU): bf16 autocast,
fused AdamW, SDPA, cosine schedule, stopped at its step count or its time cap, whichever comes first.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# depth and width differ: a question is whether the rules' choices hold across both
BASES = {
    "12x768": dict(layers=12, hidden=768, heads=12, kv_heads=4, intermediate=2048),
    "24x512": dict(layers=24, hidden=512, heads=8, kv_heads=4, intermediate=1408),
}
SMOKE_BASES = {
    "2x48": dict(layers=2, hidden=48, heads=4, kv_heads=2, intermediate=96),
    "4x32": dict(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64),
}


def autocast(device: torch.device):
    # bf16 matmuls on the GPU; CPU stays float32 (bf16 matmuls there are slow and only the smoke runs there)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build_model(shape: dict, tokenizer, seed: int, max_positions: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def cosine_lr(peak: float, progress: float, warmup_fraction: float, floor: float = 0.1) -> float:
    if progress < warmup_fraction:
        return peak * max(progress / warmup_fraction, 1e-3)
    done = min(1.0, (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def corpus_loss(model, rows: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token loss over held-out corpus windows (the forgetting measure)."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch].to(device).long()
        with autocast(device):
            logits = model(input_ids=chunk[:, :-1]).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def pretrain(
    model,
    stream: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    warmup: int,
    max_seconds: float,
    seed: int,
    device: torch.device,
    log=print,
) -> dict:
    """Next-token pretraining on random windows of the stream; stops at `steps` or after `max_seconds`.

    The learning-rate schedule follows the larger of step progress and time progress, so a run cut by
    the time cap still ends at the low end of its cosine.
    """
    model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    tokens = stream.to(device)
    offsets = torch.arange(seq_len + 1, device=device)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    losses, step, stopped_by = [], 0, "steps"
    report_every = max(1, steps // 10)
    while step < steps:
        elapsed = time.perf_counter() - started
        if elapsed >= max_seconds:
            stopped_by = "time"
            break
        progress = max(step / steps, elapsed / max_seconds)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, progress, warmup / steps)
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
        rows = tokens[starts.to(device)[:, None] + offsets].long()
        with autocast(device):
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == steps:
            losses.append((step, float(loss.detach())))  # the sync here keeps the host within 10 steps of the device
            if not math.isfinite(losses[-1][1]):
                raise FloatingPointError(f"pretraining: non-finite loss at step {step}")
        if step % report_every == 0:
            log(
                f"  pretrain step {step}/{steps}  loss {float(loss.detach()):.3f}  "
                f"{time.perf_counter() - started:.0f} s"
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model.eval()
    return {
        "steps_planned": steps,
        "steps_done": step,
        "stopped_by": stopped_by,
        "seconds": seconds,
        "time_cap_s": max_seconds,
        "tokens_seen": step * batch * seq_len,
        "epochs": step * batch * seq_len / len(stream),
        "loss_curve": losses,
        "step_ms": 1000 * seconds / max(1, step),
    }


def save_base(model, directory: Path, stats: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "pretrain.json").write_text(json.dumps(stats, indent=1))


def load_base(directory: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device)
    model.requires_grad_(False)
    model.eval()
    return model
