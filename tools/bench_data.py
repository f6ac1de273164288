"""python tools/bench_data.py --rows 1000000 --ranks 2 --num-proc 2 --out docs/scale/data_1m

The tokenize-once data path (aletheia_ds/data_cache.py) at scale: --rows generated chat rows ({"messages"}:
a user turn and an assistant turn of random words) in one JSONL file, read on --ranks CPU ranks (gloo,
through aletheia_ds.dist.distributed) exactly as Run.setup does with data.cache_dir set: local rank 0
tokenizes with --num-proc workers, the others wait at the barrier and memory-map the cache. Run twice: the
first run fills an empty cache, the second starts from it. Per run and rank: seconds until the examples are
ready and peak RSS (ru_maxrss). Goal (issue 18): non-tokenizing ranks < 1 GB, cached start < 30 s.
Writes data.json and data.md in --out (the cache and the JSONL stay under --out/work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT  # first: it puts this checkout on sys.path

from aletheia_ds.io import write_json_atomic, write_text_atomic
from aletheia_ds.launchers.deepspeed import free_port, rank_env

TOKENIZER = ROOT / "examples/tiny/tokenizer"
WORDS = [
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
    "forty",
    "under",
    "after",
    "round",
]


def write_chat_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            ask = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(8, 60)))
            handle.write(
                json.dumps({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
                + "\n"
            )


def worker(args) -> None:
    """One rank: the examples as Run.setup gets them, timed; its result as JSON in --result."""
    from aletheia_ds.config import RunConfig
    from aletheia_ds.data import load_tokenizer
    from aletheia_ds.data_cache import cached_examples
    from aletheia_ds.dist import distributed

    started = time.perf_counter()
    cfg = RunConfig()
    with distributed(cfg, use_deepspeed=False) as ctx:
        tokenizer = load_tokenizer(str(TOKENIZER))
        examples = cached_examples(
            args.data,
            tokenizer,
            args.seq_len,
            args.cache,
            args.num_proc,
            ctx.local_rank == 0,
            ctx.barrier,
            log=lambda line: None,
        )
        seconds = time.perf_counter() - started
        first = examples[len(examples) - 1]  # touch the memory-mapped table
        assert first.input_ids
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        Path(args.result).write_text(
            json.dumps(
                {
                    "rank": ctx.rank,
                    "tokenizes": ctx.local_rank == 0,
                    "seconds": seconds,
                    "peak_rss_gib": rss_gib,
                    "examples": len(examples),
                }
            )
        )
        ctx.barrier()


def run_ranks(args, work: Path, label: str) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(args.ranks):
        env = rank_env(
            cpu=True,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--data",
            str(work / "chat.jsonl"),
            "--cache",
            str(work / "cache"),
            "--seq-len",
            str(args.seq_len),
            "--num-proc",
            str(args.num_proc),
            "--result",
            str(work / f"{label}-rank{rank}.json"),
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
    if any(p.wait(timeout=args.timeout) != 0 for p in procs):
        raise SystemExit(f"error: {label} run failed")
    return [json.loads((work / f"{label}-rank{rank}.json").read_text()) for rank in range(args.ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--cache")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_chat_rows(work / "chat.jsonl", args.rows)
    generate_seconds = time.perf_counter() - started
    if (work / "cache").exists():
        import shutil

        shutil.rmtree(work / "cache")
    runs = {"first": run_ranks(args, work, "first"), "cached": run_ranks(args, work, "cached")}
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "rows": args.rows,
        "ranks": args.ranks,
        "num_proc": args.num_proc,
        "seq_len": args.seq_len,
        "jsonl_bytes": (work / "chat.jsonl").stat().st_size,
        "generate_seconds": generate_seconds,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    write_json_atomic(out / "data.json", summary)
    lines = [
        f"`{summary['command']}`",
        "",
        f"{args.rows:,} chat rows ({summary['jsonl_bytes'] / 2**20:.0f} MiB JSONL), {args.ranks} CPU ranks, "
        f"{args.num_proc} tokenizer processes, {os.cpu_count()} cores",
        "",
        "| run | rank | tokenizes | seconds to examples ready | peak RSS (GiB) |",
        "|---|---|---|---|---|",
    ]
    for label, ranks in runs.items():
        lines += [
            f"| {label} | {r['rank']} | {'yes' if r['tokenizes'] and label == 'first' else 'no'} | "
            f"{r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |"
            for r in ranks
        ]
    write_text_atomic(out / "data.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
