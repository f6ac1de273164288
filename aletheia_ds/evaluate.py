"""Held-out loss (token-weighted mean next-token loss over batches, reduced across ranks), perplexity, exact
match of greedy completions, and forgetting: the adapter's loss against the base model's on a second file.

    aletheia-ds eval --model DIR --adapter RUN/adapter --data eval.jsonl --forgetting-data general.jsonl --out e.json
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .data import IGNORE, shard_indices


def predicted_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def held_out_loss(
    forward: Callable[[dict], torch.Tensor],
    batches: Sequence[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    weight: Callable[[dict], int] = predicted_tokens,
) -> float:
    """`forward(batch)` returns the model's mean token loss (or the mean of what `weight(batch)` counts: pairs
    for a preference loss); batches are dealt round-robin over ranks."""
    if not batches:
        return float("nan")
    totals = torch.zeros(2, dtype=torch.float64)
    for index in shard_indices(len(batches), rank, world_size):
        batch = batches[0 if index is None else index]
        loss = forward(batch)  # every rank runs the pass: ZeRO-3 gathers collectively
        if index is not None:
            count = weight(batch)
            totals += torch.tensor([float(loss) * count, count], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def perplexity(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")  # exp overflows past ~709


def prompt_completion_rows(source: str, limit: int) -> list[tuple[str, str]]:
    """The first `limit` (prompt, completion) rows of a file; [] when its rows are another format."""
    from .data import read_rows, row_format

    rows = read_rows(source)
    if not rows or row_format(rows[0][1], rows[0][0]) != "prompt_completion":
        return []
    return [(str(row.get("prompt", "")), str(row["completion"])) for _, row in rows[:limit]]


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int, device: torch.device) -> str:
    """The completion greedy decoding writes after `prompt`, tokenized as training sees it (special tokens on)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def exact_match(model, tokenizer, rows: Sequence[tuple[str, str]], max_new_tokens: int, device: torch.device) -> dict:
    """Share of rows whose greedy completion equals the reference after stripping surrounding whitespace."""
    hits = 0
    samples = []
    for prompt, completion in rows:
        got = greedy_completion(model, tokenizer, prompt, max_new_tokens, device)
        hits += got.strip() == completion.strip()
        if len(samples) < 3:
            samples.append({"prompt": prompt, "reference": completion, "generated": got[:200]})
    return {
        "exact_match": hits / len(rows) if rows else float("nan"),
        "rows": len(rows),
        "matches": hits,
        "samples": samples,
    }


def evaluate_adapter(
    model: str,
    adapter: str | None,
    data: str,
    tokenizer: str | None = None,
    seq_len: int = 1024,
    batches: int = 8,
    batch_size: int = 4,
    verify_logits: str | None = None,
    random_init: bool = False,
    forgetting_data: str | None = None,
    exact_match_rows: int = 0,
    max_new_tokens: int = 64,
    trust_remote_code: bool = False,
) -> dict:
    """Reload base (+ adapter) with plain transformers/PEFT, as any user would, and score them.

    Returns base_loss / base_perplexity (and adapter_* with an adapter) on `data`; with `exact_match_rows`,
    exact match of greedy completions on that many prompt/completion rows of `data`; with `forgetting_data`,
    both models' loss there and forgetting = adapter loss - base loss (> 0: the adapter lost some of it).
    """
    import contextlib
    from pathlib import Path

    from .config import ConfigError, ModelSection
    from .data import fixed_batches, load_examples, load_tokenizer
    from .io import load_safetensors
    from .model import check_safetensors_shards, load_model

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter!r} has no adapter_config.json")
    for flag, path in (
        ("--model", model),
        ("--data", data),
        ("--forgetting-data", forgetting_data),
        ("--verify-logits", verify_logits),
    ):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{flag}: {path!r} does not exist")
    if verify_logits and adapter is None:
        raise ConfigError("--verify-logits: needs --adapter (the logits are the trained model's)")
    check_safetensors_shards(model, "--model")  # a truncated copy: one line now, not after the data loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(tokenizer or model, trust_remote_code)
    quiet = lambda *_: None  # noqa: E731 (the JSON result is the output)
    eval_batches = fixed_batches(load_examples(data, tok, seq_len, log=quiet), batch_size, batches, tok.pad_token_id)
    forget_batches = (
        fixed_batches(load_examples(forgetting_data, tok, seq_len, log=quiet), batch_size, batches, tok.pad_token_id)
        if forgetting_data
        else []
    )
    em_rows = prompt_completion_rows(data, exact_match_rows) if exact_match_rows else []
    base = load_model(
        ModelSection(path=model, random_init=random_init, dtype="float32", trust_remote_code=trust_remote_code),
        torch.float32,
        device,
        contextlib.nullcontext,
    ).eval()

    def forward_with(net):
        return lambda batch: net(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss

    def score(net, prefix: str) -> dict:
        out = {f"{prefix}_loss": held_out_loss(forward_with(net), eval_batches)}
        out[f"{prefix}_perplexity"] = perplexity(out[f"{prefix}_loss"])
        if em_rows:
            out[f"{prefix}_exact_match"] = exact_match(net, tok, em_rows, max_new_tokens, device)
        if forget_batches:
            out[f"{prefix}_forgetting_loss"] = held_out_loss(forward_with(net), forget_batches)
        return out

    result = {"data": data, "tokens": sum(predicted_tokens(b) for b in eval_batches), **score(base, "base")}
    if exact_match_rows and not em_rows:
        result["exact_match_skipped"] = f"{data}: rows are not prompt/completion"
    if adapter is None:
        return result
    from peft import PeftModel

    from .adapters.export import check_adapter_fits

    check_adapter_fits(base, adapter)
    tuned = PeftModel.from_pretrained(base, adapter).to(device).eval()
    from .adapters.experts import load_expert_adapter

    load_expert_adapter(tuned, adapter)  # per-expert LoRA of megablocks banks, when the adapter has one
    empty = [n for n, p in tuned.named_parameters() if "lora_" in n and p.numel() == 0]
    if empty:
        raise ConfigError(f"--adapter: {len(empty)} empty LoRA tensors (first: {empty[0]})")
    result.update(score(tuned, "adapter"))
    if forget_batches:
        result["forgetting_data"] = forgetting_data
        result["forgetting"] = result["adapter_forgetting_loss"] - result["base_forgetting_loss"]
    if verify_logits:
        saved = load_safetensors(verify_logits)
        with torch.no_grad():
            logits = (
                tuned(
                    input_ids=saved["input_ids"].to(device),
                    attention_mask=saved["attention_mask"].to(device),
                    use_cache=False,
                )
                .logits.float()
                .cpu()
            )
        mask = saved["attention_mask"].bool()
        diff = (logits - saved["logits"])[mask].abs()
        scale = saved["logits"][mask].abs().max()
        result["logits_max_abs_diff"] = float(diff.max())
        result["logits_match"] = bool(diff.max() <= 1e-4 * max(1.0, float(scale)))
    return result
