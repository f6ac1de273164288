"""python tools/profile_step.py --shape qwen2-72b --layers 16 --gpus 1 --micro-batch 8 --out runs/profile/72b-16l

Where a training step of the real job goes: torch.profiler over a few steps of `aletheia_ds.train.Run` (same
config as tools/bench_scale.py: random weights of the shape under zero.Init, ZeRO-3 ds_configs/zero3_70b.json,
probe, plan, DeepSpeed engine), after --warmup unprofiled steps. Per rank, averaged over the profiled steps:
  compute     GPU kernels other than NCCL's, by phase: forward, backward, recompute (the checkpointed layers'
              second forward, tagged through checkpoint's context_fn), optimizer (DeepSpeed's step), other
  all-gather / reduce-scatter / all-reduce   NCCL kernel time, and the exposed part: time in which such a
              kernel ran and no compute kernel did (communication the step waited for)
  host gaps   step time in which no kernel ran at all (launch overhead, Python, synchronisation)
Writes profile.json (every rank) and profile.md (rank 0's table) in --out; --trace also keeps rank 0's Chrome
trace (trace_rank0.json.gz). `--arm`, `--set` and the job flags as in tools/bench_scale.py (e.g. `--set
train.liger=false train.no_recompute_layers=4`). `--cpu`: a smoke run on CPU ranks (no kernels: step time and
host phases only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import ARMS, DENSE_SHAPES, add_job_args, arm_overrides, finish_job_args, run_logged, write_config
from bench_scale import launcher, run_config, write_data

from aletheia_ds.io import write_json_atomic, write_text_atomic

PHASES = ("forward", "backward", "recompute", "optimizer")
COLLECTIVES = {"all_gather": ("allgather",), "reduce_scatter": ("reducescatter",), "all_reduce": ("allreduce",)}


# --------------------------------------------------------------------------- trace analysis (pure)
def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _minus(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the union of `intervals` outside the union `cover` (both merged)."""
    exposed, j = 0.0, 0
    for start, end in intervals:
        covered = 0.0
        while j < len(cover) and cover[j][1] <= start:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < end:
            covered += min(end, cover[k][1]) - max(start, cover[k][0])
            k += 1
        exposed += (end - start) - covered
    return exposed


def collective_kind(kernel_name: str) -> str | None:
    name = kernel_name.lower()
    if "nccl" not in name:
        return None
    for kind, keys in COLLECTIVES.items():
        if any(key in name.replace("_", "") for key in keys):
            return kind
    return "other_collective"


def breakdown(events: list[dict]) -> dict:
    """Seconds per step from a Chrome trace's events (torch.profiler's export): steps are the `train_step`
    annotations, phases the innermost PHASES annotation around each kernel's launch."""
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == "train_step"]
    phases = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") in PHASES]
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]

    def phase_of(ts: float | None) -> str:
        if ts is None:
            return "other"
        inside = [p for p in phases if p["ts"] <= ts <= p["ts"] + p["dur"]]
        return min(inside, key=lambda p: p["dur"])["name"] if inside else "other"

    per_step = []
    for step in steps:
        lo, hi = step["ts"], step["ts"] + step["dur"]
        in_step = [k for k in kernels if lo <= k["ts"] < hi]
        compute = {p: 0.0 for p in (*PHASES, "other")}
        compute_intervals, nccl = [], {}
        for k in in_step:
            span = (k["ts"], min(k["ts"] + k["dur"], hi))
            kind = collective_kind(k["name"])
            if kind is None:
                compute[phase_of(launches.get(k.get("args", {}).get("correlation")))] += k["dur"]
                compute_intervals.append(span)
            else:
                nccl.setdefault(kind, []).append(span)
        compute_union = _union(compute_intervals)
        busy = _union([(k["ts"], min(k["ts"] + k["dur"], hi)) for k in in_step])
        host = {
            p: sum(
                min(e["ts"] + e["dur"], hi) - max(e["ts"], lo) for e in phases if e["name"] == p and lo <= e["ts"] < hi
            )
            for p in PHASES
        }
        per_step.append(
            {
                "step_s": step["dur"],
                "compute_s": {p: v for p, v in compute.items()},
                "compute_busy_s": _length(compute_union),
                "collectives_s": {kind: _length(_union(spans)) for kind, spans in nccl.items()},
                "exposed_s": {kind: _minus(_union(spans), compute_union) for kind, spans in nccl.items()},
                "gpu_idle_s": step["dur"] - _length(busy),
                "host_phase_s": host,
            }
        )
    if not per_step:
        raise ValueError("no train_step annotation in the trace")
    return _mean_seconds(per_step)


def _mean_seconds(rows: list[dict]) -> dict:
    """The mean of each (nested) microsecond field over the steps, in seconds."""

    def mean(values):
        if isinstance(values[0], dict):
            keys = sorted({k for v in values for k in v})
            return {k: mean([v.get(k, 0.0) for v in values]) for k in keys}
        return sum(values) / len(values) / 1e6

    return {"steps": len(rows), **{key: mean([r[key] for r in rows]) for key in rows[0]}}


def markdown(meta: dict, ranks: list[dict]) -> str:
    b = ranks[0]
    step = b["step_s"]
    lines = [
        f"# Step profile: {meta['shape']} on {meta['gpus']} x {meta['device']} ({meta['arm']})",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['micro_batch']} x {meta['seq_len']} tokens per GPU per step; checkpointing "
        f"{'on' if meta['checkpointing'] else 'off'}; overrides {meta['overrides'] or 'none'}; rank 0, mean of "
        f"{b['steps']} profiled steps after {meta['warmup']}.",
        "",
        "| part | s/step | share |",
        "|---|---|---|",
        f"| step | {step:.3f} | 100% |",
    ]

    def row(label: str, seconds: float) -> None:
        lines.append(f"| {label} | {seconds:.3f} | {seconds / step:.1%} |")

    for phase in (*PHASES, "other"):
        row(f"compute: {phase}", b["compute_s"].get(phase, 0.0))
    for kind in sorted(b["collectives_s"]):
        row(
            f"{kind.replace('_', '-')}: exposed (of {b['collectives_s'][kind]:.3f} s in NCCL kernels)",
            b["exposed_s"][kind],
        )
    row("host gaps (no kernel running)", b["gpu_idle_s"])
    if not b["compute_busy_s"]:  # CPU ranks: no kernels, so the host's time in each phase is what there is
        for phase in PHASES:
            row(f"host time in {phase}", b["host_phase_s"].get(phase, 0.0))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- worker (one rank of the job)
def tagged(fn, name: str):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return run


def tag_recompute(model) -> None:
    """The checkpointed layers' second forward runs inside a `recompute` annotation (checkpoint's context_fn)."""
    from torch.profiler import record_function
    from torch.utils.checkpoint import checkpoint

    def contexts():
        return contextlib.nullcontext(), record_function("recompute")

    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = functools.partial(
                checkpoint, use_reentrant=False, context_fn=contexts
            )


def worker(argv: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    from aletheia_ds.config import load_config
    from aletheia_ds.dist import distributed
    from aletheia_ds.train import Run

    parser = argparse.ArgumentParser()
    parser.add_argument("--profile-worker", required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--profile-steps", type=int, required=True)
    parser.add_argument("--trace", action="store_true")
    known, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if not a.startswith("--local_rank")]
    out = Path(known.profile_worker)
    cfg = load_config(rest)
    with distributed(cfg) as ctx:
        run = Run.setup(ctx, cfg)
        run.prepare_training(run.plan(run.probe()))
        run._forward_loss = tagged(run._forward_loss, "forward")
        run.engine.backward = tagged(run.engine.backward, "backward")
        run.engine.step = tagged(run.engine.step, "optimizer")
        tag_recompute(run.execution.base)
        for step in range(known.warmup):
            run.train_step(step)
        cuda = ctx.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for step in range(known.warmup, known.warmup + known.profile_steps):
                with record_function("train_step"):
                    run.train_step(step)  # ends in a host sync (the step's loss)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
            if known.trace and ctx.rank == 0:
                with trace.open("rb") as src, gzip.open(out / "trace_rank0.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        write_json_atomic(out / f"breakdown_rank{ctx.rank}.json", breakdown(events))


# --------------------------------------------------------------------------- driver
def main() -> None:
    if "--profile-worker" in sys.argv:
        worker(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--shape", choices=sorted(DENSE_SHAPES), default="qwen2-72b")
    parser.add_argument("--layers", type=int, default=16)
    add_job_args(parser, steps=0, micro_batch=8, seq_len=1024, probe_batches=1, timeout=900)
    parser.add_argument("--arm", choices=list(ARMS), default="uniform")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="keep rank 0's Chrome trace (gzipped)")
    parser.add_argument("--out", required=True)
    args = finish_job_args(parser.parse_args())
    import yaml

    out = Path(args.out)
    for sub in ("model", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for stale in out.glob("breakdown_rank*.json"):
        stale.unlink()
    write_config(args.shape, out / "model", args.layers)
    args.steps = args.warmup + args.profile_steps
    tokens = args.gpus * args.micro_batch * args.seq_len
    write_data(out / "data" / "train.jsonl", int((args.steps + args.probe_batches + 2) * tokens * 1.2), seed=0)
    write_data(out / "data" / "eval.jsonl", tokens * 2, seed=1)
    config_path = out / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_config(args, out / "model", out / "data")))
    overrides = [f"train.output_dir={out / 'run'}", *arm_overrides(args.arm), *args.set]
    worker_args = ["--profile-worker", str(out), "--warmup", str(args.warmup), "--profile-steps"]
    worker_args += [str(args.profile_steps), *(["--trace"] if args.trace else []), "--config", str(config_path)]
    run_logged(
        launcher(args, str(Path(__file__).resolve()), [*worker_args, *overrides]),
        out / "log.txt",
        cpu=args.cpu,
        timeout=args.timeout,
    )
    ranks = [json.loads((out / f"breakdown_rank{r}.json").read_text()) for r in range(args.gpus)]
    import torch

    meta = {
        "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
        "gpus": args.gpus,
        "device": "CPU ranks" if args.cpu else torch.cuda.get_device_name(0),
        "arm": args.arm,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "checkpointing": args.checkpointing,
        "warmup": args.warmup,
        "overrides": " ".join(args.set),
        "ds_config": args.ds_config,
    }
    write_json_atomic(out / "profile.json", {"meta": meta, "ranks": ranks})
    write_text_atomic(out / "profile.md", markdown(meta, ranks))
    print((out / "profile.md").read_text(), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
