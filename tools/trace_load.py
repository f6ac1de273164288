"""deepspeed --num_gpus 2 tools/trace_load.py --model /tmp/ck15 --out /tmp/trace_load.json

The memory of the job's ZeRO-3 load (`from_pretrained` under zero.Init, shard by shard:
aletheia_ds.dist.zero3_load_shard_by_shard) split by phase, per rank:
  build_peak          the peak while zero.Init builds the model, before any weight is read
  held_at_copy_start  what the rank holds when the first shard group's copy starts (half the model, for 2 ranks)
  copy_peak           the peak while the shards are copied into the partitions
  held_after          what the rank holds once from_pretrained returns
On GPUs: torch's allocated memory (the peak reset when the copy starts). On CPU ranks (`DS_ACCELERATOR=cpu`,
gloo): anonymous host memory, sampled (aletheia_ds.host_memory), as growth over `before`. No collection is forced
between phases: a weight dropped but still held by a reference cycle shows as held. tools/bench_load.py measures
the whole job; this splits its build.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import _common  # noqa: F401  (it puts this checkout on sys.path)
import torch

from aletheia_ds.host_memory import HostMemoryPeaks, host_memory_gib

GIB = 2**30


class Meter:
    """GPU: allocated memory and its peak; CPU: anonymous host memory, its peak sampled in a background thread."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._peaks: HostMemoryPeaks | None = None

    def held(self) -> float:
        return torch.cuda.memory_allocated() / GIB if self.cuda else host_memory_gib()["anon"]

    def start_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._peaks = HostMemoryPeaks(interval_s=0.002).__enter__()  # stopped by peak()

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / GIB
        self._peaks.__exit__(None, None, None)
        return self._peaks.summary("anon")["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a sharded safetensors checkpoint folder")
    parser.add_argument("--out", help="write every rank's phases here as JSON (rank 0)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the launcher's
    args = parser.parse_args()

    import deepspeed
    import torch.distributed as dist
    import transformers.modeling_utils as loading
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from aletheia_ds.dist import zero3_load_shard_by_shard
    from aletheia_ds.io import write_json_atomic

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dtype = getattr(torch, args.dtype)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    ds_config["bf16"] = {"enabled": dtype == torch.bfloat16}
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers builds under zero.Init while this lives
    meter = Meter(cuda)
    phases = {"rank": dist.get_rank(), "device": "cuda" if cuda else "cpu", "before": meter.held()}
    copy_in = loading._load_state_dict_into_zero3_model  # called once per shard group, inside the job's load

    def copy_group(model, state_dict, load_config=None):
        if "held_at_copy_start" not in phases:
            phases["build_peak"] = meter.peak()
            phases["held_at_copy_start"] = meter.held()
            meter.start_peak()
        return copy_in(model, state_dict, load_config)

    meter.start_peak()
    loading._load_state_dict_into_zero3_model = copy_group
    try:
        with zero3_load_shard_by_shard():
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    finally:
        loading._load_state_dict_into_zero3_model = copy_in
    phases["copy_peak"] = meter.peak()
    phases["held_after"] = meter.held()
    del model, keep_alive
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: round(v, 4) if isinstance(v, float) else v for k, v in phases.items()})
    if dist.get_rank() == 0:
        unit = "GiB allocated on the GPU" if cuda else "GiB of anonymous host memory"
        print(f"{args.model}: {unit}")
        print("| rank | before | build peak | held at copy start | copy peak | held after |")
        print("|---|---|---|---|---|---|")
        for p in everyone:
            print(
                f"| {p['rank']} | {p['before']:.3f} | {p['build_peak']:.3f} | {p['held_at_copy_start']:.3f} | "
                f"{p['copy_peak']:.3f} | {p['held_after']:.3f} |"
            )
        if args.out:
            write_json_atomic(Path(args.out), {"model": args.model, "unit": unit, "ranks": everyone})


if __name__ == "__main__":
    main()
