"""python tools/bench_speed.py --out OUT_DIR [--shapes qwen2.5-1.5b qwen2.5-7b] [--budget 0.6] [--dpo] [--smoke]
       [--layers N] [--rows ROW ...] [--modes no_checkpointing checkpointing]

Side by side, one run, same shape/data/seed, random weights of the real shape, bf16, one GPU:
  uniform          PEFT LoRA r16 on every target module of every layer (bf16 adapters, as DeepSpeed's bf16 engine)
  uniform_fp32     the same with PEFT's default fp32 adapters (what plain PEFT eager runs)
  paper            the paper's rule: top 50% of layers by probe score, attention r16 / MLP r64
  budget           this project's budgeted plan (calibrated cost model), frozen-prefix execution
  budget_no_prefix the same plan on the standard path (HF/LLaMA-Factory recipe: enable_input_require_grads
                   under checkpointing), to show what the frozen prefix adds
  budget_compiled  the budgeted plan with torch.compile on the adapted layers (--compile)
  budget_cached    the budgeted plan in a later epoch with the prefix cache (prefix output stored, replayed)
  peer             with --peer: the peer stack (tools/peer_trainer.py: transformers Trainer + PEFT LoRA r16 on every
                   layer + DeepSpeed ZeRO-3, --peer-ds-config) on the same shape, batch and GPU, launched as its own
                   process after the other rows (same as tools/bench_scale.py's peer arms; its data are
                   bench_scale.write_data's packed text, not these random ids)
  dpo_*            (--dpo) DPO steps (reference pass with the adapters disabled + policy pass + backward; the
                   batch's first half chosen rows, second half rejected): dpo_uniform (uniform r16),
                   dpo_budget (the budgeted plan made from a probe of the DPO loss, frozen prefix shared by
                   the reference and policy passes) and dpo_budget_unshared (the same plan, the reference
                   running its own prefix: what sharing saves); speedups against dpo_uniform
each without and with gradient checkpointing (the peer: with; --modes picks; --rows runs only the rows named).
--layers N builds N decoder layers of each shape's widths: with it a large shape also runs on CPU (float32).
Per row: median step time over >= 10 steps after warm-up, tokens/s, peak memory, predicted vs measured step
time, net speedup over uniform including the probe over 1000 steps. Also: probe seconds vs a chunked
full-weight-gradient probe (8 layers unfrozen at a time, .grad norms) on the same batches. Writes
bench_speed.json, bench_speed.md and bench_speed.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import (  # first: it puts this checkout on sys.path
    PEER_ARMS,
    ROOT,
    SHAPES,
    arm_section,
    model_config,
    random_model,
    run_logged,
    write_config,
)

from aletheia_ds.arch import describe
from aletheia_ds.cost import CostModel
from aletheia_ds.objectives import Objective
from aletheia_ds.plan import Plan, make_plan
from aletheia_ds.probe.run import run_probe
from aletheia_ds.speed import calibrate, device_name, random_batch, time_plan


def chunked_reference_probe(model, layout, batches, chunk_layers: int = 8) -> float:
    """The reference method: unfreeze `chunk_layers` layers' targets at a time, backprop, read .grad norms."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    modules = list(layout.iter_modules(model))
    for first in range(0, layout.num_layers, chunk_layers):
        chunk = [m for layer, _, m in modules if first <= layer < first + chunk_layers]
        for m in chunk:
            m.weight.requires_grad_(True)
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            loss.backward()
            norms = [m.weight.grad.float().pow(2).sum() for m in chunk]
            torch.stack(norms).sum().item()
            for m in chunk:
                m.weight.grad = None
        for m in chunk:
            m.weight.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def probe(model, layout, batches, objective: Objective | None = None):
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    objective = objective or Objective()
    return run_probe(
        model,
        layout,
        batches,
        lambda b: objective.start_loss(model, {k: v.to(device) for k, v in b.items()}),
        model_name="random",
    )


def predicted_seconds(cost: CostModel, plan: Plan, frozen_prefix: bool, checkpointing: bool) -> float:
    adapters = cost.plan_adapters(plan)
    if checkpointing and not frozen_prefix:
        # the standard recipe makes the embedding output require grad: backward (and recompute) reach layer 0
        return cost.predict(adapters) + cost.depth_seconds(0) - cost.depth_seconds(plan.lowest_adapted_layer)
    return cost.predict(adapters)


def run_shape(name: str, args, device, dtype, log) -> dict:
    shape = SHAPES[name]
    t0 = time.perf_counter()
    model = random_model(model_config(name, args.layers), dtype=dtype, device=device)
    layout = describe(model)
    log(f"[{name}] built in {time.perf_counter() - t0:.1f} s on {device_name()}")
    vocab = shape["vocab_size"]
    batch = random_batch(args.batch_size, args.seq_len, vocab, seed=1)
    probe_batches = [
        random_batch(args.batch_size, args.seq_len, vocab, seed=100 + i) for i in range(args.probe_batches)
    ]

    probe(model, layout, probe_batches[:1])  # warm-up (kernels, allocator)
    report = probe(model, layout, probe_batches)
    peak_probe = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    reference_s = chunked_reference_probe(model, layout, probe_batches)
    log(
        f"[{name}] probe {report.seconds:.2f} s for {len(probe_batches)} batches; chunked reference {reference_s:.2f} s"
    )
    dpo = Objective("dpo") if args.dpo else None
    dpo_report = probe(model, layout, probe_batches, dpo) if dpo else None  # the plan DPO's own probe makes
    result = {
        "shape": name,
        "config": shape,
        "layers": model.config.num_hidden_layers,
        "batch": [args.batch_size, args.seq_len],
        "probe": {
            "seconds": report.seconds,
            "batches": len(probe_batches),
            "chunked_reference_seconds": reference_s,
            "speedup_vs_reference": reference_s / report.seconds,
            "peak_memory_gib": peak_probe,
            "top_layers": sorted(range(report.num_layers), key=lambda i: -report.layers[i].score)[:8],
        },
        "modes": {},
    }
    for checkpointing in (False, True):
        mode = "checkpointing" if checkpointing else "no_checkpointing"
        if mode not in args.modes:
            continue
        if time.perf_counter() > args.deadline:
            log(f"[{name}/{mode}] skipped (--time-budget-s reached)")
            continue
        t1 = time.perf_counter()
        cost = calibrate(
            model,
            layout,
            batch,
            checkpointing=checkpointing,
            steps=args.calibration_steps,
            adapter_dtype=dtype,
            log=lambda m: log(f"[{name}/{mode}] {m}"),
        )
        calibration_s = time.perf_counter() - t1
        plans = {
            "uniform": make_plan(report, arm_section("uniform"), cost),
            "paper": make_plan(report, arm_section("paper"), cost),
            "budget": make_plan(report, arm_section("budget", budget=args.budget, mlp_r=args.budget_mlp_r), cost),
        }
        if dpo_report is not None:
            budget = arm_section("budget", budget=args.budget, mlp_r=args.budget_mlp_r)
            plans["dpo_budget"] = make_plan(dpo_report, budget, cost)
        # (row, plan, frozen prefix, adapter dtype, compiled, prefix cache[, objective, shared prefix])
        rows = [
            ("uniform", "uniform", False, dtype, False, False),
            ("paper", "paper", False, dtype, False, False),
            ("budget", "budget", True, dtype, False, False),
            ("budget_no_prefix", "budget", False, dtype, False, False),
        ]
        if dpo is not None:
            rows += [
                ("dpo_uniform", "uniform", False, dtype, False, False, dpo, False),
                ("dpo_budget", "dpo_budget", True, dtype, False, False, dpo, True),
                ("dpo_budget_unshared", "dpo_budget", True, dtype, False, False, dpo, False),
            ]
        if not checkpointing:
            rows.insert(1, ("uniform_fp32", "uniform", False, None, False, False))
        if args.compile and not checkpointing:
            rows.append(("budget_compiled", "budget", True, dtype, True, False))
        if plans["budget"].lowest_adapted_layer > 0:
            rows.append(("budget_cached", "budget", True, dtype, False, True))
        if args.rows:
            rows = [row for row in rows if row[0] in args.rows]
        measured = {}
        for row, plan_name, frozen_prefix, adapter_dtype, compiled, cached, *preference in rows:
            objective, shared = preference or (None, False)
            if time.perf_counter() > args.deadline:
                log(f"[{name}/{mode}] {row}: skipped (--time-budget-s reached)")
                continue
            plan = plans[plan_name]
            timing = time_plan(
                model,
                layout,
                plan,
                batch,
                steps=args.steps,
                warmup=args.warmup,
                checkpointing=checkpointing,
                frozen_prefix=frozen_prefix,
                adapter_dtype=adapter_dtype,
                compile_layers=compiled,
                prefix_cache=cached,
                objective=objective,
                shared_prefix=shared,
            )
            measured[row] = {
                "plan": plan_name,
                "layers": plan.layers,
                "lowest_adapted_layer": plan.lowest_adapted_layer,
                "adapters": len(plan.modules),
                "score_captured": plan.score_captured,
                "frozen_prefix": frozen_prefix,
                "adapter_dtype": str(adapter_dtype or "fp32 (PEFT default)"),
                "compiled": compiled,
                "prefix_cache": cached,
                "prefix_cache_bytes_per_token": shape["hidden_size"] * (2 if dtype == torch.bfloat16 else 4)
                if cached
                else 0,
                "objective": objective.name if objective else "sft",
                "shared_prefix": shared,
                "median_step_s": timing.median_s,
                "step_times_s": timing.steps,
                "tokens_per_s": timing.tokens_per_s,
                "peak_memory_gib": timing.peak_memory_gib,
                # the cost model is fitted on SFT steps; a DPO step adds a gradient-free reference pass
                "predicted_step_s": predicted_seconds(cost, plan, frozen_prefix, checkpointing)
                if objective is None
                else float("nan"),
            }
            log(
                f"[{name}/{mode}] {row}: {timing.median_s * 1000:.1f} ms/step (predicted "
                f"{measured[row]['predicted_step_s'] * 1000:.1f}), {timing.tokens_per_s:,.0f} tok/s, "
                f"{timing.peak_memory_gib:.1f} GiB, layers {plan.layers[0]}..{plan.layers[-1]} ({len(plan.layers)})"
            )
        uniform = measured["uniform"]["median_step_s"] if "uniform" in measured else None
        for row in measured.values():
            if uniform is not None:
                row["speedup_vs_uniform"] = uniform / row["median_step_s"]
                row["net_speedup_1000_steps"] = 1000 * uniform / (1000 * row["median_step_s"] + report.seconds)
            if row["objective"] != "sft" and "dpo_uniform" in measured:
                row["speedup_vs_dpo_uniform"] = measured["dpo_uniform"]["median_step_s"] / row["median_step_s"]
            row["prediction_error"] = row["predicted_step_s"] / row["median_step_s"] - 1
        result["modes"][mode] = {"rows": measured, "calibration_seconds": calibration_s, "cost_model": cost.to_json()}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_peer(name: str, args, out: Path, log) -> dict:
    """The peer arm on one GPU: tools/peer_trainer.py under the DeepSpeed launcher; its summary.json, or the reason
    it failed (out of memory, anything raised)."""
    from bench_scale import failure_reason, write_data

    from aletheia_ds.launchers.deepspeed import deepspeed_command, free_port

    run_dir = out / f"peer_{name}"
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    write_config(name, run_dir / "model")
    steps = args.steps + args.warmup
    write_data(run_dir / "train.jsonl", int((steps + 2) * args.batch_size * args.seq_len * 1.2), seed=0)
    script_args = ["--arm", args.peer, "--model", str(run_dir / "model"), "--train", str(run_dir / "train.jsonl")]
    script_args += ["--ds-config", str(ROOT / PEER_ARMS[args.peer]), "--out", str(run_dir), "--steps", str(steps)]
    script_args += ["--warmup", str(args.warmup), "--micro-batch", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cpu = not torch.cuda.is_available()
    cmd = deepspeed_command(
        str(ROOT / "tools/peer_trainer.py"),
        script_args + (["--cpu"] if cpu else []),
        num_gpus=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
        interpreter_runner=True,
    )
    try:
        run_logged(cmd, run_dir / "log.txt", cpu=cpu, timeout=args.peer_timeout)
    except (SystemExit, subprocess.TimeoutExpired) as err:
        reason = failure_reason(run_dir, err)
        log(f"[{name}] peer ({args.peer}): failed: {reason}")
        return {"arm": args.peer, "failed": reason}
    summary = json.loads((run_dir / "summary.json").read_text())
    log(
        f"[{name}] peer ({args.peer}): {summary['step_seconds'] * 1000:.1f} ms/step, "
        f"{summary['tokens_per_s_per_gpu']:,.0f} tok/s"
    )
    return summary


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _shape_name(res: dict) -> str:
    """The shape, with its layer count when --layers ran fewer than the shape has."""
    full = res["config"].get("num_hidden_layers")
    layers = res.get("layers", full)
    return res["shape"] if layers == full else f"{res['shape']} ({layers} layers)"


def markdown(results: list[dict]) -> str:
    lines = [
        "| shape | checkpointing | row | layers (lowest) | ms/step | pred. ms | tokens/s | peak GiB | speedup "
        "| net speedup (1000 steps, with probe) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for mode, body in res["modes"].items():
            for row, r in body["rows"].items():
                lines.append(
                    f"| {_shape_name(res)} | {'on' if mode == 'checkpointing' else 'off'} | {row} | "
                    f"{len(r['layers'])} ({r['lowest_adapted_layer']}) | {r['median_step_s'] * 1000:.1f} | "
                    f"{r['predicted_step_s'] * 1000:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gib']:.1f} | "
                    f"{_ratio(r.get('speedup_vs_uniform'))} | {_ratio(r.get('net_speedup_1000_steps'))} |"
                    # DPO rows: against DPO on uniform LoRA, the step they replace
                    + (f" {r['speedup_vs_dpo_uniform']:.2f}x vs dpo_uniform |" if "speedup_vs_dpo_uniform" in r else "")
                )
    for res in results:
        peer = res.get("peer")
        if peer and "failed" in peer:
            lines.append(f"| {res['shape']} | on | peer: {peer['arm']} | failed: {peer['failed']} | | | | | | |")
        elif peer:
            uniform = res["modes"].get("checkpointing", {}).get("rows", {}).get("uniform")
            speedup = f"{uniform['median_step_s'] / peer['step_seconds']:.2f}x" if uniform else "–"
            peak = max(peer["peak_memory_gib"]["train"] or [float("nan")])
            lines.append(
                f"| {res['shape']} | on | peer: {peer['arm']} (Trainer + PEFT + ZeRO-3) | "
                f"{peer['layers_adapted']} (0) | {peer['step_seconds'] * 1000:.1f} | – | "
                f"{peer['tokens_per_s_per_gpu']:,.0f} | {peak:.1f} | {speedup} | – |"
            )
    lines += [
        "",
        "| shape | probe s (batches) | chunked reference s | probe speedup | probe / uniform step per batch |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        p = res["probe"]
        if "uniform" not in res["modes"].get("no_checkpointing", {}).get("rows", {}):
            continue
        uniform = res["modes"]["no_checkpointing"]["rows"]["uniform"]["median_step_s"]
        lines.append(
            f"| {res['shape']} | {p['seconds']:.2f} ({p['batches']}) | {p['chunked_reference_seconds']:.2f} | "
            f"{p['speedup_vs_reference']:.1f}x | {p['seconds'] / p['batches'] / uniform:.2f} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(res["shape"], mode, body["rows"]) for res in results for mode, body in res["modes"].items()]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    for ax, (shape, mode, rows) in zip(axes[0], groups):
        names = list(rows)
        ax.bar(
            range(len(names)),
            [rows[n]["tokens_per_s"] for n in names],
            color=[
                "tab:gray" if n.startswith("uniform") else "tab:blue" if n == "paper" else "tab:orange" for n in names
            ],
        )
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{shape}, checkpointing {'on' if mode == 'checkpointing' else 'off'}", fontsize=9)
        ax.set_ylabel("tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--budget-mlp-r", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peer", choices=sorted(PEER_ARMS), help="also run this peer arm (tools/peer_trainer.py)")
    parser.add_argument("--peer-timeout", type=float, default=1800, help="seconds for the peer arm")
    parser.add_argument(
        "--dpo", action="store_true", help="DPO rows: uniform vs the budgeted plan, prefix shared or not"
    )
    parser.add_argument("--moe-shape", help="also run tools/bench_moe.py on this MoE shape (e.g. qwen3-30b-a3b)")
    parser.add_argument("--moe-layers", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, few steps")
    parser.add_argument(
        "--layers", type=int, help="fewer decoder layers of each shape's widths (a CPU measurement of a large shape)"
    )
    parser.add_argument("--rows", nargs="+", help="only these rows (e.g. dpo_uniform dpo_budget dpo_budget_unshared)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["no_checkpointing", "checkpointing"],
        default=["no_checkpointing", "checkpointing"],
        help="without and/or with gradient checkpointing",
    )
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="skip remaining rows after this many seconds")
    args = parser.parse_args()
    args.deadline = time.perf_counter() + args.time_budget_s
    if args.dpo and args.batch_size % 2:
        parser.error("--dpo: --batch-size must be even (half chosen rows, half rejected)")
    if args.smoke:
        args.shapes, args.batch_size, args.seq_len, args.probe_batches = ["tiny"], 2, 32, 2
        args.steps, args.warmup, args.calibration_steps = 2, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    too_big = [name for name in args.shapes if device.type == "cpu" and not name.startswith("tiny") and not args.layers]
    if too_big:  # a 7B shape in fp32 is ~30 GB of host memory and minutes per step: refused before it is built
        parser.error(
            f"--shapes {' '.join(too_big)}: needs a CUDA device (none visible); on CPU run --smoke, or a few layers "
            "of its widths with --layers N"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    results = []
    for name in args.shapes:
        results.append(run_shape(name, args, device, dtype, log))
        if args.peer:
            results[-1]["peer"] = run_peer(name, args, out, log)
        blob = {"device": device_name(), "torch": torch.__version__, "command": " ".join(sys.argv), "results": results}
        (out / "bench_speed.json").write_text(json.dumps(blob, indent=1))  # after each shape: partial results survive
        (out / "bench_speed.md").write_text(markdown(results))
    text = markdown(results)
    if args.moe_shape:
        # the MoE row: uniform expert LoRA vs the expert-aware plan, same harness conventions (tools/bench_moe.py)
        import bench_moe

        moe_argv = (
            ["--smoke"]
            if args.smoke
            else [
                "--shape",
                args.moe_shape,
                "--layers",
                str(args.moe_layers),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
        )
        moe_rows = bench_moe.main(moe_argv + ["--out", str(out / "bench_moe.json")])
        blob["moe"] = moe_rows
        (out / "bench_speed.json").write_text(json.dumps(blob, indent=1))
        uniform = next(r for r in moe_rows if r["variant"] == "uniform")
        text += (
            "\n| MoE shape | row | layers | experts adapted | ms/step | tokens/s | peak GiB | speedup |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
        for r in moe_rows:
            text += (
                f"| {r['shape']} ({r['layers']} layers) | {r['variant']} | {r['adapted_layers']} | "
                f"{r['expert_adapters']}/{r['experts_total']} | {r['median_step_s'] * 1000:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['peak_memory_gib'] or float('nan'):.1f} | "
                f"{uniform['median_step_s'] / r['median_step_s']:.2f}x |\n"
            )
        (out / "bench_speed.md").write_text(text)
    chart(results, out / "bench_speed.png")
    print(text)


if __name__ == "__main__":
    main()
