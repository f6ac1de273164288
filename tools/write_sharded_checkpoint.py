"""python tools/write_sharded_checkpoint.py --shape qwen2.5-32b --out /data/qwen2.5-32b-random --shard-gb 5

A random-weight checkpoint of a named shape (tools/bench_scale.py SHAPES) in the standard Hugging Face
layout: config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json, bf16 by default.
Streams: the tensors of one shard are drawn, written and dropped before the next shard, so host memory
stays about one shard (a 32B model is ~65 GB on disk and needs ~5 GB of RAM at --shard-gb 5).

Names and shapes come from a weightless ("meta") model of the config, mapped to the on-disk names with
transformers' revert_weight_conversion (MoE banks are stored per expert), so the folder loads with
from_pretrained like a downloaded one. Norm weights are ones, everything else N(0, 0.02), seeded per tensor.

  --layers N   fewer layers of the same widths        --dtype float32|bfloat16|float16
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import torch
from _common import SHAPES  # it puts this checkout on sys.path

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def disk_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """[(name as stored on disk, shape)] in the model's parameter order."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = []
    for name, param in model.named_parameters():  # tied weights are listed once
        for disk_name, tensor in revert_weight_conversion(model, {name: param}).items():
            out.append((disk_name, tuple(tensor.shape)))
    return out


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_checkpoint(
    shape: dict, out: Path, shard_bytes: int, dtype: str = "bfloat16", layers: int | None = None, seed: int = 0
) -> dict:
    """Write the checkpoint; returns {"files", "total_bytes", "seconds"}."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    spec = dict(shape)
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, tensor_shape in disk_tensors(config):
        size = element * int(torch.Size(tensor_shape).numel())
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, tensor_shape))
        filled += size
    started, weight_map, total = time.perf_counter(), {}, 0
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, s, DTYPES[dtype], seed) for name, s in group}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
        print(f"{file}: {len(group)} tensors, {time.perf_counter() - started:.0f} s", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"files": len(groups), "total_bytes": total, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = write_checkpoint(
        SHAPES[args.shape], Path(args.out), int(args.shard_gb * 2**30), args.dtype, args.layers, args.seed
    )
    print(f"{args.out}: {result['files']} shards, {result['total_bytes'] / 2**30:.2f} GiB, {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
