"""python tools/bench_scale.py --shape qwen2-72b --gpus 2 --out docs/scale/qwen2-72b_2gpu

Large shapes under ZeRO-3, side by side in one run: the real job (`deepspeed launch/train.py`) once per arm
on a random-weight model of the named shape, built under zero.Init (never whole on one rank or in host RAM):
  uniform   PEFT LoRA r16 on every target linear of every layer
  paper     the paper's rule: top 50% of layers by probe score, attention r16 / MLP r64
  budget    this project's budgeted plan (plan.rule=budget, whole layers), frozen-prefix execution
  peer_tuned / peer_stock   the peer stack (tools/peer_trainer.py: transformers Trainer + PEFT LoRA r16 on every
            layer + ZeRO-3) with ds_configs/peer_zero3_tuned.json (zero3_70b.json's values) or
            ds_configs/peer_zero3_stock.json (LLaMA-Factory's ds_z3_config.json); same model, data, tokens per GPU
The first of the job's arms runs the sharded probe; the others reuse its probe.json (same scores, same data).
Arms can be
run in separate calls into the same --out (`--arms uniform`, then `--arms budget paper`): earlier arms stay in
the table and their probe.json is reused. Per arm:
median tokens/s per GPU over the steps after --warmup, model FLOPs utilisation (aletheia_ds.cost.
lora_step_flops_per_token over --peak-tflops), peak GPU memory per rank of the probe and of training, probe,
build and export seconds. `--link-rate` first times NCCL all-gathers on the same GPUs, and each arm gets the
all-gather volume per step that ZeRO-3 implies for its plan and the time that volume takes at that rate.
Writes scale.json and scale.md in --out; each arm's run directory (probe.json, plan.json, metrics.jsonl,
eval.json, adapter/, log.txt) stays under it.

  --layers N       fewer layers of the same widths (tuning runs: same per-layer behaviour, quicker)
  --cpu            smoke run on CPU ranks over gloo (tests/distributed/test_bench_scale.py), float32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    ARMS,
    DENSE_SHAPES,
    PEER_ARMS,
    ROOT,
    add_job_args,
    arm_overrides,
    finish_job_args,  # first
    run_logged,
    write_config,
)  # first: checkout on sys.path

from aletheia_ds.cost import lora_step_flops_per_token
from aletheia_ds.io import write_json_atomic, write_text_atomic
from aletheia_ds.launchers.deepspeed import deepspeed_command, free_port

H200_BF16_DENSE_TFLOPS = 989.0


def write_data(path: Path, tokens: int, seed: int) -> None:
    """Random sentences over a fixed word list (the shipped tokenizer; ids stay inside any vocab >= 512)."""
    import random

    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "seven",
        "north",
        "light",
        "paper",
        "table",
        "green",
        "quick",
        "house",
        "water",
        "metal",
        "seven",
        "forty",
        "under",
        "after",
        "round",
    ]
    rows, approx = [], 0
    while approx < tokens:
        text = " ".join(rng.choice(words) for _ in range(200)) + "."
        rows.append(json.dumps({"text": text}))
        approx += 200
    path.write_text("\n".join(rows) + "\n")


def run_config(args, model_dir: Path, data_dir: Path) -> dict:
    return {
        "model": {
            "path": str(model_dir),
            "tokenizer": str(ROOT / "examples/tiny/tokenizer"),
            "random_init": True,
            "dtype": "float32" if args.cpu else "bfloat16",
        },
        "data": {
            "train": str(data_dir / "train.jsonl"),
            "eval": str(data_dir / "eval.jsonl"),
            "seq_len": args.seq_len,
            "packing": True,
            "eval_batches": 1,
        },
        "probe": {"batches": args.probe_batches, "batch_size": args.micro_batch},
        "plan": {"budget": args.budget},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "grad_accum": 1,
            "lr": 1e-4,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
            "log_every": 1,
            "save_every": 0,
            "gradient_checkpointing": args.checkpointing,
            "seed": 0,
        },
        "deepspeed": {"config": str(Path(args.ds_config).resolve())},
    }


def launcher(args, script: str, script_args: list[str]) -> list[str]:
    return deepspeed_command(
        script,
        script_args,
        num_gpus=args.gpus,
        include=f"localhost:{args.gpu_ids}" if args.gpu_ids else None,
        master_addr="127.0.0.1",
        master_port=free_port(),
        interpreter_runner=True,
    )


# --------------------------------------------------------------------------- link rate (worker side)
def link_worker(out: Path, megabytes: int, reps: int) -> None:
    """Timed all_gather_into_tensor of `megabytes` per rank (ZeRO-3's collective for parameters)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    shard = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    full = torch.empty(shard.numel() * world, dtype=shard.dtype, device=device)
    for _ in range(3):
        dist.all_gather_into_tensor(full, shard)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        dist.all_gather_into_tensor(full, shard)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / reps
    received = shard.numel() * shard.element_size() * (world - 1)  # bytes each rank receives
    if dist.get_rank() == 0:
        write_json_atomic(
            out,
            {
                "world_size": world,
                "shard_bytes": shard.numel() * shard.element_size(),
                "seconds": seconds,
                "received_bytes_per_rank": received,
                "received_gb_per_s": received / seconds / 1e9,
                "bus_gb_per_s": received / seconds / 1e9,
            },
        )  # NCCL's busbw for all-gather
    dist.destroy_process_group()


# --------------------------------------------------------------------------- analysis
def all_gather_bytes_per_step(
    config: dict,
    lowest: int | None,
    world: int,
    dtype_bytes: int,
    persistence_threshold: int,
    checkpointing: bool,
    reuse: bool,
) -> float:
    """Bytes each rank receives in ZeRO-3's parameter all-gathers in one optimizer step of one micro-batch.

    Forward gathers every partitioned weight once; backward gathers the layers from the top down to the lowest
    adapted one, and the LM head, again (their recompute under checkpointing needs them too, a third time
    unless the gathered copy is still live: `reuse`). Weights at or below the persistence threshold are never
    gathered. The (world-1)/world factor: a rank already holds its own partition.
    """
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    matrices = [
        hidden * hidden,
        hidden * kv,
        hidden * kv,
        hidden * hidden,
        hidden * inter,
        hidden * inter,
        inter * hidden,
    ]
    layer = sum(m for m in matrices if m > persistence_threshold)
    embed = vocab * hidden if vocab * hidden > persistence_threshold else 0
    head = 0 if config.get("tie_word_embeddings") else embed
    forward = layers * layer + embed + head
    if lowest is None:  # nothing adapted: no backward
        return forward * dtype_bytes * (world - 1) / world
    backward = (layers - lowest) * layer * (1 if reuse or not checkpointing else 2) + head
    return (forward + backward) * dtype_bytes * (world - 1) / world


def throughput(rows: list[dict], warmup: int, gpus: int, flops_per_token: float, peak_tflops: float) -> dict:
    """Medians of the metrics.jsonl rows after `warmup` steps: step time, tokens/s per GPU, model FLOPs
    utilisation (the job's arms here, the peer arms in tools/peer_trainer.py)."""
    timed = [r for r in rows if r["step"] > warmup] or rows
    step_seconds = statistics.median(r["step_seconds"] for r in timed)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)  # all ranks' tokens / step time
    per_gpu = tokens_per_s / gpus
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_seconds": step_seconds,
        "tokens_per_step": round(tokens_per_s * step_seconds),
        "tokens_per_s_per_gpu": per_gpu,
        "model_tflops_per_gpu": flops_per_token * per_gpu / 1e12,
        "mfu": flops_per_token * per_gpu / (peak_tflops * 1e12),
        "flops_per_token": flops_per_token,
    }


def summarize(arm: str, run_dir: Path, config: dict, args, link: dict | None, ds: dict) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results = json.loads((run_dir / "eval.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    probe = json.loads((run_dir / "probe.json").read_text())
    shapes = probe["layout"]["module_shapes"]
    modules = plan["modules"]
    adapters = [(m["layer"], m["r"], *shapes[m["key"]]) for m in modules]
    matmul_params = [sum(i * o for i, o in shapes.values())] * config["num_hidden_layers"]
    flops_per_token = lora_step_flops_per_token(
        matmul_params, config["hidden_size"], config["vocab_size"], args.seq_len, adapters
    )
    lowest = plan.get("lowest_adapted_layer")
    zero = ds.get("zero_optimization", {})
    threshold = int(float(zero.get("stage3_param_persistence_threshold", 1e5)))
    reuse_distance = float(zero.get("stage3_max_reuse_distance", 1e9))
    layer_params = sum(i * o for i, o in shapes.values())
    summary = {
        "arm": arm,
        "rule": plan["rule"],
        "layers_adapted": len(plan["layers"]),
        "lowest_adapted_layer": lowest,
        "adapters": len(modules),
        **throughput(rows, args.warmup, args.gpus, flops_per_token, args.peak_tflops),
        "predicted_speedup": (plan.get("predicted") or {}).get("speedup_vs_uniform"),
        "seconds": results.get("seconds", {}),
        "peak_memory_gib": results.get("peak_memory_gib", {}),
        "eval_loss_before": results.get("eval_loss_before"),
        "eval_loss_after": results.get("eval_loss_after"),
        "base_held_fraction_by_rank": [
            h / results["base_parameters"]["total"] for h in results.get("base_parameters", {}).get("held_by_rank", [])
        ],
        "host_rss_gib_by_rank": results.get("peak_host_rss_gib_by_rank"),
        "adapter_bytes": sum(f.stat().st_size for f in (run_dir / "adapter").glob("*")),
        "run_dir": str(run_dir),
    }
    if link:
        volume = all_gather_bytes_per_step(
            config,
            lowest,
            args.gpus,
            2 if not args.cpu else 4,
            threshold,
            args.checkpointing,
            reuse=reuse_distance >= layer_params,
        )
        summary["all_gather_gb_per_step"] = volume / 1e9
        summary["all_gather_seconds_at_link_rate"] = volume / (link["received_gb_per_s"] * 1e9)
    return summary


def arm_spec(text: str) -> str:
    """An --arms entry: a job or peer arm, a job arm optionally with `:key=value,key=value` overrides of its own."""
    base, _, own = text.partition(":")
    if base not in ARMS and base not in PEER_ARMS:
        raise argparse.ArgumentTypeError(f"unknown arm {base!r}; arms: {', '.join([*ARMS, *PEER_ARMS])}")
    if own and (base in PEER_ARMS or not all("=" in o for o in own.split(","))):
        raise argparse.ArgumentTypeError(f"{text!r}: only job arms take overrides, as ARM:key=value,key=value")
    return text


def arm_dir(out: Path, arm: str) -> Path:
    """An arm's run directory: its name, overrides included, in file-name characters."""
    return out / "".join(c if c.isalnum() or c in "._-" else "_" for c in arm)


def peer_command(args, arm: str, run_dir: Path, out: Path) -> list[str]:
    """The launcher command of a peer arm: tools/peer_trainer.py on the same model, data and tokens per GPU."""
    script_args = [
        "--arm",
        arm,
        "--model",
        str(out / "model"),
        "--train",
        str(out / "data" / "train.jsonl"),
        "--ds-config",
        str(ROOT / PEER_ARMS[arm]),
        "--out",
        str(run_dir),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--micro-batch",
        str(args.micro_batch),
        "--seq-len",
        str(args.seq_len),
        "--peak-tflops",
        str(args.peak_tflops),
    ]
    script_args += [] if args.checkpointing else ["--no-checkpointing"]
    script_args += ["--cpu"] if args.cpu else []
    return launcher(args, str(ROOT / "tools/peer_trainer.py"), script_args)


def failure_reason(run_dir: Path, err: BaseException) -> str:
    """Why an arm failed, in a table cell: a peer rank's own account, else out of memory when the log says so,
    else the first line of the error."""
    accounts = sorted(run_dir.glob("failed_rank*.json"))
    if accounts:
        return json.loads(accounts[0].read_text())["reason"]
    if isinstance(err, subprocess.TimeoutExpired):
        return f"timed out after {err.timeout:.0f} s"
    log = run_dir / "log.txt"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "OutOfMemoryError" in text or "out of memory" in text.lower():
        return "out of memory (log.txt)"
    return str(err).splitlines()[0]


def markdown(meta: dict, arms: list[dict]) -> str:
    uniform = next((a for a in arms if a["arm"] == "uniform"), None)
    lines = [
        f"# {meta['shape']} on {meta['gpus']} x {meta['device']}",
        "",
        f"`{meta['command']}`",
        "",
        f"ZeRO-3 config `{meta['ds_config']}`; {meta['micro_batch']} x {meta['seq_len']} tokens per GPU per "
        f"step; gradient checkpointing {'on' if meta['checkpointing'] else 'off'}; {meta['steps']} steps per "
        f"arm, medians of the steps after {meta['warmup']}; MFU against {meta['peak_tflops']:.0f} TFLOP/s "
        "per GPU (model FLOPs: `aletheia_ds.cost.lora_step_flops_per_token`, recompute not counted).",
        "",
    ]
    if meta.get("link"):
        link = meta["link"]
        lines += [
            f"NCCL all-gather, {link['shard_bytes'] / 2**20:.0f} MiB per rank: {link['received_gb_per_s']:.0f} "
            "GB/s received per rank.",
            "",
        ]
    head = (
        "| arm | layers (lowest) | adapters | s/step | tokens/s/GPU | MFU | speedup | peak GiB train "
        "(probe) | probe s | build s | export s |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]

    def num(value, spec: str) -> str:
        return "–" if value is None or value != value else format(value, spec)

    for a in arms:
        speedup = uniform["step_seconds"] / a["step_seconds"] if uniform else None
        peak, seconds = a["peak_memory_gib"], a["seconds"]
        train_peak = max(peak["train"]) if peak.get("train") and None not in peak["train"] else None
        probe_peak = max(peak["probe"]) if peak.get("probe") else None
        lines.append(
            f"| {a['arm']} ({a['rule']}) | {a['layers_adapted']} ({a['lowest_adapted_layer']}) | "
            f"{a['adapters']} | {a['step_seconds']:.2f} | {a['tokens_per_s_per_gpu']:,.0f} | "
            f"{a['mfu']:.1%} | {num(speedup, '.2f')}x | {num(train_peak, '.1f')} ({num(probe_peak, '.1f')}) | "
            f"{num(seconds.get('probe'), '.1f')} | {num(seconds.get('build'), '.1f')} | "
            f"{num(seconds.get('export'), '.1f')} |"
        )
    for f in meta.get("failed") or []:
        lines.append(f"| {f['arm']} | failed: {f['error']} |" + " |" * (head.count("|") - 3))
    first = next((a for a in arms if a["base_held_fraction_by_rank"]), None)
    if first:
        held = ", ".join(f"{f:.1%}" for f in first["base_held_fraction_by_rank"])
        rss = ", ".join(f"{r:.1f}" for r in first["host_rss_gib_by_rank"] or [])
        lines += [
            "",
            f"Base weights held per rank after the zero.Init build: {held} of the model; host memory "
            f"peak per rank at that point: {rss} GiB. Probe seconds: the first arm probes, the others reuse "
            "its probe.json.",
        ]
    if any("all_gather_gb_per_step" in a for a in arms):
        lines += [
            "",
            "| arm | all-gather GB per step per GPU | at the link rate, s | share of the step |",
            "|---|---|---|---|",
        ]
        for a in (a for a in arms if "all_gather_gb_per_step" in a):
            lines.append(
                f"| {a['arm']} | {a['all_gather_gb_per_step']:.1f} | "
                f"{a['all_gather_seconds_at_link_rate']:.2f} | "
                f"{a['all_gather_seconds_at_link_rate'] / a['step_seconds']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def device_name(cpu: bool) -> str:
    if cpu:
        return "CPU ranks"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown device"


def main() -> None:
    if "--link-worker" in sys.argv:  # one rank of the all-gather timing, started by the deepspeed launcher
        worker = argparse.ArgumentParser()
        worker.add_argument("--link-worker", required=True)
        worker.add_argument("--link-mb", type=int, default=512)
        known, _ = worker.parse_known_args()  # the launcher adds --local_rank
        link_worker(Path(known.link_worker), known.link_mb, reps=10)
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(DENSE_SHAPES), default="qwen2-72b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    add_job_args(parser, steps=20, micro_batch=4, seq_len=1024, probe_batches=2, timeout=1800)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--arms",
        nargs="+",
        type=arm_spec,
        default=list(ARMS),
        help=f"{', '.join([*ARMS, *PEER_ARMS])}; a job arm may carry overrides of its own, as a lever measured on/off "
        "in one table: uniform:train.liger=false,train.no_recompute_layers=4",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--link-rate", action="store_true", help="time NCCL all-gathers first")
    parser.add_argument("--link-only", action="store_true", help="only time the all-gathers (link.json)")
    parser.add_argument("--link-json", help="a link.json measured before (e.g. while nothing else ran)")
    parser.add_argument("--probe-report", help="a probe.json to reuse for every arm (default: probe in the first)")
    parser.add_argument("--link-mb", type=int, default=512)
    args = finish_job_args(parser.parse_args())
    import yaml

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    config = write_config(args.shape, out / "model", args.layers)
    needed = (
        args.steps + 2
    ) * args.gpus * args.micro_batch * args.seq_len + args.probe_batches * args.gpus * args.micro_batch * args.seq_len
    write_data(out / "data" / "train.jsonl", int(needed * 1.2), seed=0)
    write_data(out / "data" / "eval.jsonl", args.micro_batch * args.seq_len * args.gpus * 2, seed=1)
    config_path = out / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_config(args, out / "model", out / "data")))
    ds_path = Path(args.ds_config).resolve()
    ds = json.loads(ds_path.read_text())
    link_json = Path(args.link_json) if args.link_json else out / "link.json"  # one measured before into --out
    link = json.loads(link_json.read_text()) if link_json.is_file() else None
    if args.link_rate or args.link_only:
        run_logged(
            launcher(
                args,
                str(Path(__file__).resolve()),
                ["--link-worker", str(out / "link.json"), "--link-mb", str(args.link_mb)],
            ),
            out / "link.log",
            cpu=args.cpu,
            timeout=args.timeout,
        )
        link = json.loads((out / "link.json").read_text())
        print(f"all-gather: {link['received_gb_per_s']:.0f} GB/s received per rank", flush=True)
        if args.link_only:
            return
    # arms run before into the same --out (e.g. one per 10-minute call) stay in the table; a probe.json there
    # (or --probe-report) is reused instead of probing again
    earlier = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    summaries = [a for a in earlier.get("arms", []) if a["arm"] not in args.arms]
    failed = [f for f in earlier.get("failed", []) if f["arm"] not in args.arms]
    probe_report = (
        Path(args.probe_report)
        if args.probe_report
        else next(
            (
                arm_dir(out, a["arm"]) / "probe.json"
                for a in summaries
                if (arm_dir(out, a["arm"]) / "probe.json").is_file()
            ),
            None,
        )
    )
    for arm in args.arms:
        run_dir = arm_dir(out, arm)
        run_dir.mkdir(exist_ok=True)
        peer = arm in PEER_ARMS
        for stale in run_dir.glob("failed_rank*.json"):
            stale.unlink()
        base, _, own = arm.partition(":")
        own_overrides = [o for o in own.split(",") if o]
        overrides = [f"train.output_dir={run_dir}", *([] if peer else arm_overrides(base)), *args.set, *own_overrides]
        if probe_report is not None:
            overrides.append(f"probe.report={probe_report}")
        started = time.perf_counter()
        try:
            cmd = (
                peer_command(args, arm, run_dir, out)
                if peer
                else launcher(args, str(ROOT / "launch/train.py"), ["--config", str(config_path), *overrides])
            )
            run_logged(cmd, run_dir / "log.txt", cpu=args.cpu, timeout=args.timeout)
        except (SystemExit, subprocess.TimeoutExpired) as err:  # the other arms still run and are reported
            print(err, flush=True)
            failed.append({"arm": arm, "error": failure_reason(run_dir, err)})
            if probe_report is None and not peer:
                break  # the job's other arms need its probe.json
            continue
        if peer:
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            probe_report = probe_report or run_dir / "probe.json"
            summary = summarize(arm, run_dir, config, args, link, ds)
        summary["wall_seconds"] = time.perf_counter() - started
        summaries.append(summary)
        write_json_atomic(
            out / "scale.json", {"meta": None, "arms": summaries, "failed": failed}
        )  # partial, until the last arm
        print(
            f"{arm}: {summary['step_seconds']:.2f} s/step, {summary['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
            f"MFU {summary['mfu']:.1%}, wall {summary['wall_seconds']:.0f} s",
            flush=True,
        )
    meta = {
        "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
        "gpus": args.gpus,
        "device": device_name(args.cpu),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "ds_config": ds_path.relative_to(ROOT).as_posix() if ds_path.is_relative_to(ROOT) else str(ds_path),
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "checkpointing": args.checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "model_config": config,
        "link": link,
        "zero_optimization": ds.get("zero_optimization"),
    }
    write_json_atomic(out / "scale.json", {"meta": meta, "arms": summaries, "failed": failed})
    write_text_atomic(out / "scale.md", markdown({**meta, "failed": failed}, summaries))
    print((out / "scale.md").read_text())
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
