"""python tools/bench_moe.py --shape qwen3-30b-a3b --layers 8 --batch-size 4 --seq-len 2048 --steps 12 \
    --out bench_moe.json

Uniform expert LoRA vs an expert-aware plan on a MoE model of a real shape (fewer layers, random weights, one GPU):
  uniform       LoRA r16 on every attention linear and on every expert of every layer (PEFT target_parameters)
  expert_aware  probe -> plan with the package defaults (top_pct 50 of layers; in each chosen layer the fewest
                experts covering 80% of its expert gradient energy; attention r16, experts r16)
Each variant: a fresh model (same seed), adapters attached by aletheia_ds.adapters.attach.attach, AdamW on the adapters,
`--warmup` untimed steps, then `--steps` timed steps (forward + backward + optimizer step, synchronised).
Reports the median step time, tokens/s and peak GPU memory, one JSON row per variant (also written to --out).

Shapes: qwen3-30b-a3b (128 experts, top-8, hidden 2048), mixtral-8x7b (8 experts, top-2, hidden 4096), or
--smoke: a tiny qwen3_moe (tiny-moe) on CPU in seconds (what tests/distributed/test_bench_moe.py runs):
    python tools/bench_moe.py --smoke --out /tmp/bench_moe_smoke.json
Other knobs: --expert-rule/--expert-energy/--expert-top-k/--top-pct (the aware plan), --checkpointing, --dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from _common import MOE_SHAPES, arm_section, model_config, random_model  # first: it puts this checkout on sys.path

from aletheia_ds.adapters.attach import attach
from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection
from aletheia_ds.plan import make_plan
from aletheia_ds.probe.run import run_probe


def build_model(args, dtype: torch.dtype, device: torch.device):
    return random_model(model_config(args.shape, args.layers), dtype=dtype, device=device)


def token_batches(count: int, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        out.append(
            {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(name: str, plan, args, dtype, device) -> dict:
    model = build_model(args, dtype, device)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned = attach(model, plan)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = token_batches(
        args.warmup + args.steps, args.batch_size, args.seq_len, model.config.vocab_size, device, seed=7
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for step, batch in enumerate(batches):
        sync(device)
        started = time.perf_counter()
        tuned(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    row = {
        "variant": name,
        "shape": args.shape,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "checkpointing": args.checkpointing,
        "steps_timed": len(seconds),
        "median_step_s": median,
        "min_step_s": min(seconds),
        "max_step_s": max(seconds),
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "trainable_params": sum(p.numel() for p in params),
        "adapted_layers": len(plan.layers),
        "module_adapters": len(plan.modules),
        "expert_adapters": len(plan.experts),
        "experts_total": sum(b.num_experts for b in plan.moe.values()),
        "score_captured": plan.score_captured,
    }
    del tuned, model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape",
        default="qwen3-30b-a3b",
        choices=[*sorted(MOE_SHAPES), "smoke"],
        help="smoke: tiny-moe, the --smoke shape",
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--top-pct", type=float, default=50.0)
    parser.add_argument("--expert-rule", default="energy", choices=["energy", "top_k", "load", "all"])
    parser.add_argument("--expert-energy", type=float, default=0.8)
    parser.add_argument("--expert-top-k", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank everywhere (attention, experts)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: --shape tiny-moe, 2 layers, few steps")
    parser.add_argument("--out", default="bench_moe.json")
    args = parser.parse_args(argv)
    if args.shape == "smoke":
        args.shape = "tiny-moe"  # the --smoke shape's name in earlier commands
    if args.smoke:
        args.shape, args.layers, args.batch_size, args.seq_len = "tiny-moe", 2, 2, 32
        args.steps, args.warmup, args.probe_batches, args.expert_top_k = 3, 1, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[args.dtype]

    # the expert-aware plan comes from a probe of the same (seeded) model on the same kind of batches
    model = build_model(args, dtype, device)
    layout = describe(model)
    batches = token_batches(args.probe_batches, args.batch_size, args.seq_len, model.config.vocab_size, device, seed=3)
    report = run_probe(model, layout, batches, lambda b, m=model: m(**b).loss)
    del model
    gc.collect()
    ranks = dict(attention_r=args.rank, mlp_r=args.rank, expert_r=args.rank)
    plans = {
        "uniform": make_plan(report, arm_section("uniform", expert_rule="all", **ranks)),
        "expert_aware": make_plan(
            report,
            PlanSection(
                rule="top_pct",
                top_pct=args.top_pct,
                expert_rule=args.expert_rule,
                expert_energy=args.expert_energy,
                expert_top_k=args.expert_top_k,
                **ranks,
            ),
        ),
    }
    rows = []
    for name, plan in plans.items():
        row = time_variant(name, plan, args, dtype, device)
        row["probe_seconds"] = report.seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
    uniform, aware = rows
    print(
        f"expert-aware vs uniform: {uniform['median_step_s'] / aware['median_step_s']:.2f}x step speed, "
        f"{aware['expert_adapters']}/{uniform['expert_adapters']} experts adapted in {aware['adapted_layers']}/"
        f"{uniform['adapted_layers']} layers, {aware['score_captured']:.0%} of the probe's gradient energy"
        + (
            f", peak memory {aware['peak_memory_gib']:.1f} vs {uniform['peak_memory_gib']:.1f} GiB"
            if device.type == "cuda"
            else ""
        ),
        flush=True,
    )
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
