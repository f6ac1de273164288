"""python tools/bench_long.py --gpus 2 --sp 2 --seq-lens 8192 16384 32768 --arms budget --out docs/scale/long

Long context under Ulysses sequence parallelism (train.sequence_parallel_size): the real job
(`deepspeed launch/train.py`, ZeRO-3, random weights of the named shape built under zero.Init) once per arm and
sequence length, each example one row of exactly --seq-len tokens (no packing: under sequence parallelism only
flash attention keeps packed examples apart), micro-batch 1, DeepSpeed's tiled loss over the vocabulary,
(unless --no-tiled-mlp) its tiled MLP, and (unless --no-checkpointing) gradient checkpointing of the adapted layers.
Arms: uniform, budget and budget_no_prefix
(the budget plan with train.frozen_prefix=false: what the frozen prefix saves at this length). Per run:
median tokens/s per GPU after --warmup, MFU (aletheia_ds.cost.lora_step_flops_per_token at that length, attention
included), peak GPU memory of probe and training; a length that does not fit is recorded as its failure (out of
memory) in the table, so a call with growing --seq-lens finds the longest that fits (after an arm's first
failure its longer lengths are not tried: they would fail too). Runs land in --out/ARM_LEN/;
calls into the same --out add rows to long.json / long.md (one call per arm and length keeps each call short).

  --layers N       fewer layers of the same widths (e.g. 40 on one GPU with --sp 1)
  --cpu            smoke run on CPU ranks over gloo, float32, with --shape tiny (tests/distributed/test_bench_long.py)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from _common import DENSE_SHAPES, ROOT, arm_overrides, run_logged, write_config  # first: checkout on sys.path
from bench_scale import H200_BF16_DENSE_TFLOPS, device_name, failure_reason, launcher, summarize

from aletheia_ds.io import write_json_atomic, write_text_atomic

LONG_ARMS = {"uniform": "uniform", "budget": "budget", "budget_no_prefix": "budget"}  # arm -> its plan settings
WORDS = "alpha beta gamma delta river stone cloud seven north light paper table green quick house water".split()


def write_long_rows(path: Path, rows: int, words: int, seed: int) -> None:
    """`rows` text rows of `words` words each; the shipped tokenizer gives at least one token per word, so
    truncation to data.seq_len = words leaves every example exactly that long."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=words))}) + "\n" for _ in range(rows)))


def job_config(args, out: Path, seq_len: int) -> dict:
    return {
        "model": {
            "path": str(out / "model"),
            "tokenizer": str(ROOT / "examples/tiny/tokenizer"),
            "random_init": True,
            "dtype": "float32" if args.cpu else "bfloat16",
            "attn_implementation": "sdpa",
        },
        "data": {
            "train": str(out / "data" / f"train_{seq_len}.jsonl"),
            "eval": str(out / "data" / f"eval_{seq_len}.jsonl"),
            "seq_len": seq_len,
            "eval_batches": 1,
        },
        "probe": {"batches": args.probe_batches, "batch_size": 1},
        "plan": {"budget": args.budget},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": 1,
            "lr": 1e-4,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
            # without it every layer's activations at 8k-32k tokens per rank stay until backward
            "gradient_checkpointing": args.checkpointing,
            "sequence_parallel_size": args.sp,
            "tiled_mlp": args.tiled_mlp,
            "seed": 0,
        },
        "deepspeed": {"config": str(Path(args.ds_config).resolve())},
    }


def markdown(meta: dict, rows: list[dict], failed: list[dict]) -> str:
    lines = [
        f"# {meta['shape']}, long context, sequence parallel {meta['sp']} on {meta['gpus']} x {meta['device']}",
        "",
        f"`{meta['command']}`",
        "",
        "One example of the given length per sequence group per micro-batch; tiled loss; tiled MLP "
        f"{'on' if meta['tiled_mlp'] else 'off'}; gradient checkpointing {'on' if meta['checkpointing'] else 'off'}; "
        "MFU against "
        f"{meta['peak_tflops']:.0f} TFLOP/s per GPU.",
        "",
        "| arm | tokens | layers (lowest) | s/step | tokens/s/GPU | MFU | peak GiB train (probe) | probe s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arm"], r["seq_len"])):
        peak = r["peak_memory_gib"]
        train = max(peak["train"]) if peak.get("train") else float("nan")
        probe = max(peak["probe"]) if peak.get("probe") else float("nan")
        lines.append(
            f"| {r['arm']} | {r['seq_len']:,} | {r['layers_adapted']} ({r['lowest_adapted_layer']}) | "
            f"{r['step_seconds']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
            f"{train:.1f} ({probe:.1f}) | "
            f"{r['seconds'].get('probe', float('nan')):.1f} |"
        )
    for f in failed:
        lines.append(f"| {f['arm']} | {f['seq_len']:,} | failed: {f['error']} | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(DENSE_SHAPES), default="qwen2-72b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--sp", type=int, default=2, help="train.sequence_parallel_size")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--arms", nargs="+", choices=list(LONG_ARMS), default=["budget"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--probe-batches", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--no-tiled-mlp", dest="tiled_mlp", action="store_false")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero3_70b.json"))
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--timeout", type=float, default=460, help="seconds per run")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.gpu_ids, args.micro_batch = None, 1  # what bench_scale's helpers read
    import yaml

    out = Path(args.out)
    for sub in ("model", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    config = write_config(args.shape, out / "model", args.layers)
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), *args.seq_lens)
    (out / "model" / "config.json").write_text(json.dumps(config, indent=2))
    ds = json.loads(Path(args.ds_config).read_text())
    earlier = json.loads((out / "long.json").read_text()) if (out / "long.json").is_file() else {}
    done = {(a, n) for a in args.arms for n in args.seq_lens}
    rows = [r for r in earlier.get("rows", []) if (r["arm"], r["seq_len"]) not in done]
    failed = [f for f in earlier.get("failed", []) if (f["arm"], f["seq_len"]) not in done]
    failed_at: dict[str, int] = {}  # arm -> the shortest length that failed in this call
    for seq_len in args.seq_lens:
        groups = args.gpus // args.sp
        write_long_rows(
            out / "data" / f"train_{seq_len}.jsonl", (args.steps + args.probe_batches + 1) * groups, seq_len, 0
        )
        write_long_rows(out / "data" / f"eval_{seq_len}.jsonl", groups, seq_len, 1)
        config_path = out / f"run_{seq_len}.yaml"
        config_path.write_text(yaml.safe_dump(job_config(args, out, seq_len)))
        for arm in args.arms:
            if seq_len > failed_at.get(arm, seq_len):
                print(f"{arm} {seq_len}: not tried ({arm} failed at {failed_at[arm]} tokens)", flush=True)
                continue
            run_dir = out / f"{arm}_{seq_len}"
            run_dir.mkdir(exist_ok=True)
            overrides = [f"train.output_dir={run_dir}", *arm_overrides(LONG_ARMS[arm])]
            overrides += ["train.frozen_prefix=false"] if arm == "budget_no_prefix" else []
            args.seq_len = seq_len  # summarize() counts attention FLOPs at this length
            started = time.perf_counter()
            try:
                cmd = launcher(args, str(ROOT / "launch/train.py"), ["--config", str(config_path), *overrides])
                run_logged(cmd, run_dir / "log.txt", cpu=args.cpu, timeout=args.timeout)
            except (SystemExit, subprocess.TimeoutExpired) as err:
                print(err, flush=True)
                failed.append({"arm": arm, "seq_len": seq_len, "error": failure_reason(run_dir, err)})
                failed_at[arm] = min(seq_len, failed_at.get(arm, seq_len))
                continue
            row = {**summarize(arm, run_dir, config, args, None, ds), "seq_len": seq_len}
            row["wall_seconds"] = time.perf_counter() - started
            rows.append(row)
            print(
                f"{arm} {seq_len}: {row['step_seconds']:.2f} s/step, {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                f"MFU {row['mfu']:.1%}, wall {row['wall_seconds']:.0f} s",
                flush=True,
            )
    meta = {
        "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
        "gpus": args.gpus,
        "sp": args.sp,
        "device": device_name(args.cpu),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "tiled_mlp": args.tiled_mlp,
        "checkpointing": args.checkpointing,
        "peak_tflops": args.peak_tflops,
        "model_config": config,
    }
    write_json_atomic(out / "long.json", {"meta": meta, "rows": rows, "failed": failed})
    write_text_atomic(out / "long.md", markdown(meta, rows, failed))
    print((out / "long.md").read_text())


if __name__ == "__main__":
    main()
