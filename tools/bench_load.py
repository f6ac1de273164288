"""python tools/bench_load.py --model /data/qwen2.5-32b-random --gpus 2 --out docs/scale/load_qwen2.5-32b_2gpu

The real job (`deepspeed launch/train.py`: load, probe, plan, a few steps, export) on a checkpoint read from
disk (model.path -> a sharded safetensors folder, e.g. from tools/write_sharded_checkpoint.py; no
random_init), and what loading it cost, from the job's own eval.json:
  load seconds                      (seconds.build: from_pretrained under zero.Init, every rank)
  peak host RSS per rank            (peak_host_rss_gib_by_rank: ru_maxrss right after the load)
  ... split per rank                (host_anon_gib_by_rank / host_file_gib_by_rank: sampled during the load;
                                     anonymous pages are what a rank holds, file pages the mapped shards)
  base weights held per rank        (base_parameters.held_by_rank: elements of the frozen base on that rank)
  peak GPU memory per rank          (peak_memory_gib.build: torch's max_memory_allocated after the load)
and, for scale, the seconds to read the checkpoint's bytes once (`--read-once`: sequential reads of every
shard). `--cold` evicts the shards from the page cache before the read and again before the job, so both
numbers are cold reads (no root needed: posix_fadvise DONTNEED on each file). Goal (issue 18): no rank
above ~1/world_size of the model plus one shard; load within 2x of one read. Writes load.json and load.md in --out.

  --cpu   smoke run on CPU ranks over gloo (tests/distributed/test_sharded_load.py), float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, add_job_args, finish_job_args, run_logged  # first: it puts this checkout on sys.path
from bench_scale import launcher, run_config, write_data

from aletheia_ds.io import write_json_atomic, write_text_atomic


def evict_from_page_cache(model_dir: Path) -> int:
    """Drop the shards' cached pages (they were just written or read), so the next read comes from the disk."""
    shards = sorted(model_dir.glob("*.safetensors"))
    for path in shards:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(shards)


def read_once_seconds(model_dir: Path) -> tuple[float, int]:
    """Seconds to read every safetensors file once, sequentially, in 64 MiB blocks; and the bytes read."""
    started, total = time.perf_counter(), 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb", buffering=0) as handle:
            while block := handle.read(64 * 2**20):
                total += len(block)
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a sharded safetensors checkpoint folder")
    parser.add_argument("--out", required=True)
    add_job_args(parser, steps=3, micro_batch=1, seq_len=512, probe_batches=1, timeout=3600)
    parser.add_argument("--read-once", action="store_true", help="also time one sequential read of the shards")
    parser.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each read")
    args = finish_job_args(parser.parse_args())
    import yaml

    out, model_dir = Path(args.out), Path(args.model).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    tokens = (args.steps + args.probe_batches + 2) * args.gpus * args.micro_batch * args.seq_len
    write_data(out / "data/train.jsonl", int(tokens * 1.2), seed=0)
    write_data(out / "data/eval.jsonl", args.micro_batch * args.seq_len * args.gpus * 2, seed=1)
    config = run_config(args, model_dir, out / "data")
    config["model"]["random_init"] = False
    config["train"]["output_dir"] = str(out / "run")
    shutil.rmtree(out / "run", ignore_errors=True)  # a re-run of the same command measures afresh
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    if args.cold:
        evict_from_page_cache(model_dir)
    read_seconds, read_bytes = read_once_seconds(model_dir) if args.read_once else (None, None)
    if args.cold:
        evict_from_page_cache(model_dir)
    started = time.perf_counter()
    run_logged(
        launcher(args, str(ROOT / "launch/train.py"), ["--config", str(out / "run.yaml"), *args.set]),
        out / "log.txt",
        cpu=args.cpu,
        timeout=args.timeout,
    )
    results = json.loads((out / "run/eval.json").read_text())
    shard_bytes = [p.stat().st_size for p in model_dir.glob("*.safetensors")]
    held = results["base_parameters"]["held_by_rank"]
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": str(model_dir),
        "ranks": args.gpus,
        "device": "cpu" if args.cpu else "gpu",
        "checkpoint_bytes": sum(shard_bytes),
        "largest_shard_bytes": max(shard_bytes),
        "shards": len(shard_bytes),
        "load_seconds": results["seconds"]["build"],
        "read_once_seconds": read_seconds,
        "read_bytes": read_bytes,
        "cold_page_cache": args.cold,
        "peak_host_rss_gib_by_rank": results["peak_host_rss_gib_by_rank"],
        "host_anon_gib_by_rank": results.get("host_anon_gib_by_rank", []),
        "host_file_gib_by_rank": results.get("host_file_gib_by_rank", []),
        "peak_gpu_memory_gib_by_rank": (results.get("peak_memory_gib") or {}).get("build"),  # None on CPU
        "base_parameters_total": results["base_parameters"]["total"],
        "base_parameters_held_by_rank": held,
        "held_fraction_by_rank": [h / results["base_parameters"]["total"] for h in held],
        "job_wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "load.json", summary)
    gib = 2**30
    lines = [
        f"`{summary['command']}`",
        "",
        f"checkpoint: {summary['shards']} shards, {summary['checkpoint_bytes'] / gib:.1f} GiB "
        f"(largest shard {summary['largest_shard_bytes'] / gib:.2f} GiB); {args.gpus} ranks",
        "",
        "| rank | peak host RSS (GiB, ru_maxrss) | anonymous: before -> peak (GiB) | mapped files: before -> peak "
        "(GiB) | base weights held (share of the model) |",
        "|---|---|---|---|---|",
    ]

    def before_peak(entry: dict | None) -> str:
        return f"{entry['before']:.2f} -> {entry['peak']:.2f}" if entry and entry.get("peak") is not None else "-"

    for rank, (rss, share) in enumerate(zip(summary["peak_host_rss_gib_by_rank"], summary["held_fraction_by_rank"])):
        anon = summary["host_anon_gib_by_rank"][rank] if summary["host_anon_gib_by_rank"] else None
        mapped = summary["host_file_gib_by_rank"][rank] if summary["host_file_gib_by_rank"] else None
        lines.append(f"| {rank} | {rss:.2f} | {before_peak(anon)} | {before_peak(mapped)} | {share:.1%} |")
    gpu = summary["peak_gpu_memory_gib_by_rank"]
    if gpu:
        model_gib = summary["checkpoint_bytes"] / gib
        lines += [
            "",
            "peak GPU memory allocated by the load, per rank (GiB): "
            + ", ".join(f"{g:.2f}" for g in gpu)
            + f" (the model / ranks: {model_gib / args.gpus:.2f}; largest shard: "
            f"{summary['largest_shard_bytes'] / gib:.2f})",
        ]
    lines += [
        "",
        f"load: {summary['load_seconds']:.1f} s"
        + (
            f"; one sequential read of the shards: {read_seconds:.1f} s ({read_bytes / gib / read_seconds:.2f} GiB/s)"
            if read_seconds
            else ""
        ),
    ]
    write_text_atomic(out / "load.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
