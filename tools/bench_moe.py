"""python tools/bench_moe.py --shape qwen3-30b-a3b --batch-size 4 --seq-len 2048 --steps 10 --checkpointing \
    --arms peft_uniform uniform expert_aware expert_aware_top_k peer --out runs/moe/qwen3

Expert LoRA on a MoE model of a real shape (random weights; the job's arms on one GPU, in one process; the peer
under the DeepSpeed launcher on --peer-gpus GPUs):
  peft_uniform        LoRA r16 on every attention linear and every expert of every layer, the experts through
                      PEFT's target_parameters (W + BA formed per bank and step: lora.expert_forward=peft)
  uniform             the same adapters on the routed tokens only (lora.expert_forward=routed, the default)
  expert_aware        probe -> plan: top_pct 50 of layers, in each the fewest experts covering 80% of its expert
                      gradient energy (routed)
  expert_aware_top_k  the same layers, the --expert-top-k best experts of each (routed)
  peer                tools/peer_trainer.py: transformers Trainer + PEFT r16 on every layer (attention and
                      every expert bank) + ZeRO-3 (ds_configs/peer_zero3_tuned.json), MoE blocks as ZeRO-3 leaves
The job's arms share one built model (adapters attached and removed in place, aletheia_ds.speed.time_plan: frozen
prefix on, AdamW on the adapters); `--warmup` untimed steps, then `--steps` timed steps on the same batch. Per arm:
median step time, tokens/s per GPU, MFU against the active parameters (attention, router and top-k experts per
token; aletheia_ds.cost.lora_step_flops_per_token, expert adapters weighted by their token shares, recompute not
counted) over --peak-tflops, peak GPU memory. One JSON row per arm (also written to --out).

Shapes: qwen3-30b-a3b (48 layers, 128 experts, top-8), mixtral-8x7b (32 layers, 8 experts, top-2); --layers N keeps
the widths with fewer layers. --smoke: tiny-moe on CPU in seconds (tests/distributed/test_bench_moe.py):
    python tools/bench_moe.py --smoke --out /tmp/bench_moe_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from _common import MOE_SHAPES, ROOT, arm_section, model_config, random_model, run_logged, write_config
from bench_scale import H200_BF16_DENSE_TFLOPS, launcher, write_data

from aletheia_ds.arch import Layout, describe
from aletheia_ds.config import LoraSection, PlanSection
from aletheia_ds.cost import expert_adapters, lora_step_flops_per_token
from aletheia_ds.plan import Plan, make_plan
from aletheia_ds.probe.run import run_probe
from aletheia_ds.speed import time_plan

JOB_ARMS = ("peft_uniform", "uniform", "expert_aware", "expert_aware_top_k")
PEER_DS_CONFIG = "ds_configs/peer_zero3_tuned.json"


def token_batches(count: int, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        out.append(
            {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
        )
    return out


def active_flops_per_token(layout: Layout, plan: Plan, config, seq_len: int) -> float:
    """Model FLOPs of one token's training step over the parameters that token uses: attention, the router and
    its top-k experts (layer_params), plus the plan's adapters (expert ones weighted by token share)."""
    layer_params = []
    for layer, targets in enumerate(layout.layer_targets):
        params = sum(t.in_features * t.out_features for t in targets)
        block = layout.moe.get(layer)
        if block is not None:
            hidden = block.banks[0].in_features
            params += hidden * block.num_experts + block.top_k * sum(
                b.in_features * b.out_features for b in block.banks
            )
        layer_params.append(params)
    shapes = layout.shapes()
    adapters = [(m.layer, m.r, *shapes[m.key]) for m in plan.modules] + expert_adapters(plan)
    return lora_step_flops_per_token(layer_params, config.hidden_size, config.vocab_size, seq_len, adapters)


def job_row(name: str, plan: Plan, model, layout: Layout, batch: dict, args) -> dict:
    forward = "peft" if name == "peft_uniform" else "routed"
    timing = time_plan(
        model,
        layout,
        plan,
        batch,
        steps=args.steps,
        warmup=args.warmup,
        checkpointing=args.checkpointing,
        lora=LoraSection(expert_forward=forward),
    )
    flops = active_flops_per_token(layout, plan, model.config, args.seq_len)
    return {
        "variant": name,
        "expert_forward": forward,
        "gpus": 1,
        "median_step_s": timing.median_s,
        "min_step_s": min(timing.steps),
        "max_step_s": max(timing.steps),
        "steps_timed": len(timing.steps),
        "tokens_per_s": timing.tokens_per_s,
        "tokens_per_s_per_gpu": timing.tokens_per_s,
        "flops_per_token": flops,
        "mfu": flops * timing.tokens_per_s / (args.peak_tflops * 1e12),
        "peak_memory_gib": timing.peak_memory_gib if timing.peak_memory_gib == timing.peak_memory_gib else None,
        "loss_last": timing.loss,
        "trainable_params": None,
        "adapted_layers": len(plan.layers),
        "lowest_adapted_layer": plan.lowest_adapted_layer,
        "module_adapters": len(plan.modules),
        "expert_adapters": len(plan.experts),
        "experts_total": sum(b.num_experts for b in plan.moe.values()),
        "score_captured": plan.score_captured,
    }


def peer_row(args, out: Path, uniform_flops: float) -> dict:
    """tools/peer_trainer.py on the same shape, tokens per GPU and step count (its own data: packed text)."""
    run_dir = out / "peer"
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    write_config(args.shape, run_dir / "model", args.layers)
    tokens = (args.steps + args.warmup + 2) * args.peer_gpus * args.batch_size * args.seq_len
    write_data(run_dir / "train.jsonl", int(tokens * 1.2), seed=0)
    script_args = ["--arm", "peer", "--model", str(run_dir / "model"), "--train", str(run_dir / "train.jsonl")]
    script_args += ["--ds-config", str(ROOT / PEER_DS_CONFIG), "--out", str(run_dir)]
    script_args += ["--steps", str(args.steps + args.warmup), "--warmup", str(args.warmup)]
    script_args += ["--micro-batch", str(args.batch_size), "--seq-len", str(args.seq_len)]
    script_args += [] if args.checkpointing else ["--no-checkpointing"]
    script_args += ["--cpu"] if args.smoke else []
    args.gpus, args.gpu_ids = args.peer_gpus, None
    run_logged(
        launcher(args, str(ROOT / "tools/peer_trainer.py"), script_args),
        run_dir / "log.txt",
        cpu=args.smoke,
        timeout=args.peer_timeout,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    peaks = (summary.get("peak_memory_gib") or {}).get("train")
    per_gpu = summary["tokens_per_s_per_gpu"]
    return {
        "variant": "peer",
        "expert_forward": "peft (HF Trainer, ZeRO-3)",
        "gpus": args.peer_gpus,
        "median_step_s": summary["step_seconds"],
        "steps_timed": summary["timed_steps"],
        "tokens_per_s": per_gpu * args.peer_gpus,
        "tokens_per_s_per_gpu": per_gpu,
        "flops_per_token": uniform_flops,
        "mfu": uniform_flops * per_gpu / (args.peak_tflops * 1e12),
        "peak_memory_gib": max(peaks) if peaks and None not in peaks else None,
        "loss_last": summary.get("loss_last"),
        "adapted_layers": summary["layers_adapted"],
        "lowest_adapted_layer": summary["lowest_adapted_layer"],
        "module_adapters": summary["adapters"],
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].split("\n")[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=[*sorted(MOE_SHAPES), "smoke"])
    parser.add_argument("--layers", type=int, help="fewer decoder layers of the same widths (default: all)")
    parser.add_argument("--arms", nargs="+", choices=[*JOB_ARMS, "peer"], default=["peft_uniform", *JOB_ARMS[1:3]])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--top-pct", type=float, default=50.0)
    parser.add_argument("--expert-rule", default="energy", choices=["energy", "top_k", "load", "all"])
    parser.add_argument("--expert-energy", type=float, default=0.8)
    parser.add_argument("--expert-top-k", type=int, default=8, help="experts per layer of expert_aware_top_k")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank everywhere (attention, experts)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--peer-gpus", type=int, default=1, help="GPUs of the peer arm (ZeRO-3 across them)")
    parser.add_argument("--peer-timeout", type=float, default=1800)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: tiny-moe, 2 layers, few steps")
    parser.add_argument("--out", default="bench_moe.json", help="a .json file, or a directory for it and the peer")
    args = parser.parse_args(argv)
    if args.shape == "smoke":
        args.shape = "tiny-moe"  # the --smoke shape's name in earlier commands
    if args.smoke:
        args.shape, args.layers, args.batch_size, args.seq_len = "tiny-moe", 2, 2, 32
        args.steps, args.warmup, args.probe_batches, args.expert_top_k = 3, 1, 2, 2
    out_json = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "bench_moe.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[args.dtype]

    # one model for every job arm; the expert-aware plans come from a probe of it on the same kind of batches
    model = random_model(model_config(args.shape, args.layers), dtype=dtype, device=device)
    layout = describe(model)
    probe_batches = token_batches(
        args.probe_batches, args.batch_size, args.seq_len, model.config.vocab_size, device, seed=3
    )
    report = run_probe(model, layout, probe_batches, lambda b, m=model: m(**b, use_cache=False).loss)
    del probe_batches
    ranks = dict(attention_r=args.rank, mlp_r=args.rank, expert_r=args.rank)
    aware = dict(rule="top_pct", top_pct=args.top_pct, expert_energy=args.expert_energy, **ranks)
    plans = {
        "peft_uniform": make_plan(report, arm_section("uniform", expert_rule="all", **ranks)),
        "uniform": make_plan(report, arm_section("uniform", expert_rule="all", **ranks)),
        "expert_aware": make_plan(report, PlanSection(expert_rule=args.expert_rule, **aware)),
        "expert_aware_top_k": make_plan(
            report, PlanSection(expert_rule="top_k", expert_top_k=args.expert_top_k, **aware)
        ),
    }
    batch = token_batches(1, args.batch_size, args.seq_len, model.config.vocab_size, device, seed=7)[0]
    rows = []
    for name in (a for a in args.arms if a in JOB_ARMS):
        row = {"shape": args.shape, "layers": layout.num_layers, "batch_size": args.batch_size}
        row |= {"seq_len": args.seq_len, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
        row |= {"checkpointing": args.checkpointing, **job_row(name, plans[name], model, layout, batch, args)}
        row["probe_seconds"] = report.seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")  # partial rows survive a failure
    uniform_flops = active_flops_per_token(layout, plans["uniform"], model.config, args.seq_len)
    del model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "peer" in args.arms:
        row = {"shape": args.shape, "layers": layout.num_layers, "batch_size": args.batch_size}
        row |= {
            "seq_len": args.seq_len,
            "dtype": str(dtype).removeprefix("torch."),
            "checkpointing": args.checkpointing,
        }
        row |= peer_row(args, out_json.parent, uniform_flops)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(summary_table(rows), flush=True)
    return rows


def summary_table(rows: list[dict]) -> str:
    by_name = {r["variant"]: r for r in rows}
    lines = [
        "| arm | expert forward | GPUs | layers (lowest) | experts adapted | s/step | tokens/s/GPU | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        experts = f"{r['expert_adapters']}/{r['experts_total']}" if "expert_adapters" in r else "all"
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "–"
        lines.append(
            f"| {r['variant']} | {r['expert_forward']} | {r['gpus']} | {r['adapted_layers']} "
            f"({r['lowest_adapted_layer']}) | {experts} | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | {peak} |"
        )
    ratios = [
        ("uniform (routed) vs peft_uniform", "uniform", "peft_uniform"),
        ("expert_aware vs peer", "expert_aware", "peer"),
        ("expert_aware_top_k vs peer", "expert_aware_top_k", "peer"),
        ("expert_aware vs peft_uniform", "expert_aware", "peft_uniform"),
    ]
    for label, a, b in ratios:
        if a in by_name and b in by_name:
            ratio = by_name[a]["tokens_per_s_per_gpu"] / by_name[b]["tokens_per_s_per_gpu"]
            lines.append(f"\n{label}: {ratio:.2f}x tokens/s per GPU")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
