"""python tools/bench_merge.py --model /tmp/ck32-24l --adapter /tmp/load_32b-24l/run/adapter --out /tmp/merge_24l \
    --random-b 0.02 --check-logits

`aletheia-ds export --merge` on a sharded checkpoint, timed and measured in its own process, and the merged
model checked against base + adapter:
  merge seconds, peak host memory   (the merge's own report line: anonymous and mapped-file peaks, sampled;
                                     and the child's ru_maxrss as the kernel counts it)
  logits (`--check-logits`)         the merged folder loaded with plain transformers in its dtype, against the
                                     base upcast to float32 with the adapter applied by PEFT (the exact
                                     base + adapter); beside it how far the adapter moves the logits and what
                                     running the unmerged base in the checkpoint's dtype costs by itself.
                                     Passes when the merged model's error is under a quarter of the adapter's
                                     effect, as tests/unit/test_merge_streaming.py asks on CPU.
`--random-b S` merges a copy of the adapter whose lora_B factors are drawn from N(0, S) (seeded): a few steps of
training leave B so small that its product rounds away in bf16, and the check would then compare the base with
itself. Timing and memory do not depend on the values. `--cold` evicts the base's shards from the page cache
first. Writes merge.json and merge.md in --out; the merged model goes to --merged (default OUT/merged) and is
deleted afterwards unless --keep-merged.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT  # first: it puts this checkout on sys.path
from bench_load import evict_from_page_cache

from aletheia_ds.io import write_json_atomic, write_text_atomic

REPORT = re.compile(
    r"merge: (?P<seconds>[\d.]+) s; host memory peak (?P<anon>[\d.]+) GiB anonymous \(from (?P<anon0>[\d.]+)\), "
    r"(?P<file>[\d.]+) GiB mapped files \(from (?P<file0>[\d.]+)\)"
)


def randomised_adapter(adapter: Path, out: Path, scale: float, seed: int = 0) -> Path:
    """A copy of the adapter folder with every lora_B factor replaced by seeded N(0, scale) values."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out, dirs_exist_ok=True)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        generator = torch.Generator().manual_seed(seed)
        for name in sorted(tensors):
            if "lora_B" in name or "lora_embedding_B" in name:
                values = torch.randn(tensors[name].shape, generator=generator) * scale
                tensors[name] = values.to(tensors[name].dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def run_merge(model: Path, adapter: Path, merged: Path) -> dict:
    """The merge in a child process: its report line parsed, wall seconds and the child's ru_maxrss."""
    cmd = [sys.executable, "-m", "aletheia_ds.cli", "export", "--model", str(model), "--adapter", str(adapter)]
    cmd += ["--out", str(merged), "--merge"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench_merge: the merge failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    report = REPORT.search(done.stdout)
    if report is None:
        sys.exit(f"bench_merge: no report line in the merge's output:\n{done.stdout}")
    return {
        "command": " ".join(cmd[1:]),
        "seconds": float(report["seconds"]),
        "wall_seconds": wall,
        "anon_gib": {"before": float(report["anon0"]), "peak": float(report["anon"])},
        "file_gib": {"before": float(report["file0"]), "peak": float(report["file"])},
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def check_logits(model: Path, adapter: Path, merged: Path, *, seq_len: int, batch: int, seed: int = 0) -> dict:
    """Merged (its dtype, plain transformers) vs base in float32 + adapter (PEFT), on random token ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(str(model))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator).to(device)

    def logits(path: Path, dtype, adapter_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": device}).eval()
        without = None
        with torch.no_grad():
            if adapter_dir is not None:
                net = PeftModel.from_pretrained(net, str(adapter_dir)).eval()
                with net.disable_adapter():
                    without = net(input_ids=ids, use_cache=False).logits.float().cpu()
            out = net(input_ids=ids, use_cache=False).logits.float().cpu()
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return out, without

    reference, base32 = logits(model, torch.float32, adapter)
    merged_dtype = getattr(torch, json.loads((merged / "config.json").read_text())["dtype"])
    got, _ = logits(merged, merged_dtype)
    base_low, _ = logits(model, merged_dtype)
    error = (got - reference).abs()
    moved = (base32 - reference).abs().max().item()
    return {
        "device": str(device),
        "tokens": batch * seq_len,
        "merged_dtype": str(merged_dtype).removeprefix("torch."),
        "merged_max_abs_error": error.max().item(),
        "merged_mean_abs_error": error.mean().item(),
        "adapter_moves_logits_max": moved,
        "base_in_merged_dtype_max_abs_error": (base_low - base32).abs().max().item(),
        "top1_agreement": (got.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "logits_max_abs": reference.abs().max().item(),
        "passed": error.max().item() < moved / 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a sharded safetensors checkpoint folder (the base)")
    parser.add_argument("--adapter", required=True, help="an adapter folder of a run on that base")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merged", help="where the merged model goes (default OUT/merged)")
    parser.add_argument("--keep-merged", action="store_true")
    parser.add_argument("--random-b", type=float, metavar="S", help="merge a copy with lora_B ~ N(0, S)")
    parser.add_argument("--check-logits", action="store_true")
    parser.add_argument("--cold", action="store_true", help="evict the base's shards from the page cache first")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    out, model = Path(args.out), Path(args.model).resolve()
    merged = Path(args.merged) if args.merged else out / "merged"
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter).resolve()
    if args.random_b:
        adapter = randomised_adapter(adapter, out / "adapter_random_b", args.random_b)
    if args.cold:
        evict_from_page_cache(model)
    shards = [p.stat().st_size for p in model.glob("*.safetensors")]
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": str(model),
        "checkpoint_bytes": sum(shards),
        "largest_shard_bytes": max(shards),
        "shards": len(shards),
        "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("*.safetensors")),
        "random_b": args.random_b,
        "cold_page_cache": args.cold,
        "merge": run_merge(model, adapter, merged),
    }
    if args.check_logits:
        summary["logits"] = check_logits(model, adapter, merged, seq_len=args.seq_len, batch=args.batch)
    if not args.keep_merged:
        shutil.rmtree(merged)
    write_json_atomic(out / "merge.json", summary)
    gib, m = 2**30, summary["merge"]
    lines = [
        f"`{summary['command']}`",
        "",
        f"base: {summary['shards']} shards, {summary['checkpoint_bytes'] / gib:.2f} GiB (largest shard "
        f"{summary['largest_shard_bytes'] / gib:.2f} GiB); adapter {summary['adapter_bytes'] / 2**20:.1f} MiB",
        "",
        "| merge seconds | anonymous: before -> peak (GiB) | mapped files: before -> peak (GiB) | ru_maxrss (GiB) |",
        "|---|---|---|---|",
        f"| {m['seconds']:.1f} | {m['anon_gib']['before']:.2f} -> {m['anon_gib']['peak']:.2f} | "
        f"{m['file_gib']['before']:.2f} -> {m['file_gib']['peak']:.2f} | {m['ru_maxrss_gib']:.2f} |",
    ]
    if "logits" in summary:
        c = summary["logits"]
        lines += [
            "",
            f"logits on {c['device']} ({c['tokens']} tokens), merged ({c['merged_dtype']}, plain transformers) vs "
            "base in float32 + adapter (PEFT):",
            "",
            "| merged max abs error | mean | the adapter moves logits by | base alone in the merged dtype | "
            "top-1 agreement | passed (error < effect / 4) |",
            "|---|---|---|---|---|---|",
            f"| {c['merged_max_abs_error']:.4g} | {c['merged_mean_abs_error']:.3g} | "
            f"{c['adapter_moves_logits_max']:.4g} | {c['base_in_merged_dtype_max_abs_error']:.4g} | "
            f"{c['top1_agreement']:.1%} | {c['passed']} |",
        ]
    write_text_atomic(out / "merge.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if "logits" in summary and not summary["logits"]["passed"]:
        sys.exit("bench_merge: the merged model's logits are not base + adapter within the tolerance")


if __name__ == "__main__":
    main()
