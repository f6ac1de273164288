"""What the tools under tools/ share: the model shapes they benchmark, a random-weight model (or a config-only
directory) of a shape, the uniform / paper / budget arms, and the logged child process.

    from _common import SHAPES, arm_section, random_model, model_config
    model = random_model(model_config("qwen2.5-7b"), dtype=torch.bfloat16, device=torch.device("cuda"))

Tools import the package, never the reverse: launch commands and rank environments come from
aletheia_ds.launchers.deepspeed, exact match and held-out loss from aletheia_ds.evaluate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tools run from a checkout without installing the package

from aletheia_ds.config import PlanSection  # noqa: E402
from aletheia_ds.launchers.deepspeed import rank_env  # noqa: E402

# Widths from each model's config.json on the Hugging Face Hub (the repository named per entry); the
# benchmarks build random weights of these widths, so no download is needed. `--layers` style overrides keep
# the widths and change only num_hidden_layers.
DENSE_SHAPES: dict[str, dict] = {
    # Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2.5-32B-Instruct
    "qwen2.5-32b": dict(
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2-72B-Instruct
    "qwen2-72b": dict(
        model_type="qwen2",
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    # CPU smoke shape (bench_speed.py --smoke, bench_scale.py --shape tiny --cpu), not a released model.
    # vocab 600: the shipped tokenizer's 512 ids fit (examples/tiny); MLP matrices of 64 x 160 sit above
    # tests/distributed/test_bench_scale.py's persistence threshold, so ZeRO-3 partitions them there.
    "tiny": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=600,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}
MOE_SHAPES: dict[str, dict] = {
    # Qwen/Qwen3-30B-A3B (max_position_embeddings cut to 8192: longer than any benchmark sequence)
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # mistralai/Mixtral-8x7B-v0.1 (max_position_embeddings cut to 8192, as above)
    "mixtral-8x7b": dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # CPU smoke shape (tools/bench_moe.py --smoke), not a released model; vocab 600: the shipped tokenizer's
    # 512 ids fit (the peer arm trains on its text)
    "tiny-moe": dict(
        model_type="qwen3_moe",
        vocab_size=600,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
SHAPES: dict[str, dict] = {**DENSE_SHAPES, **MOE_SHAPES}

# The arms every benchmark compares, as plan settings. uniform: LoRA r16 on every target module of every
# layer; paper: the paper's rule, top 50% of layers by probe score, attention r16 / MLP r64; budget: this
# project's cost-aware plan (plan.budget sets the target, each tool its own default).
ARMS: dict[str, dict] = {
    "uniform": dict(rule="all", attention_r=16, mlp_r=16),
    "paper": dict(rule="top_pct", top_pct=50, attention_r=16, mlp_r=64),
    "budget": dict(rule="budget", attention_r=16, mlp_r=64),
}


# The peer arms (tools/peer_trainer.py: transformers Trainer + PEFT LoRA r16 on every layer + ZeRO-3, the stack
# LLaMA-Factory and axolotl run), each with its DeepSpeed config: `tuned` this project's zero3_70b.json values,
# `stock` the ZeRO-3 config LLaMA-Factory ships.
PEER_ARMS: dict[str, str] = {
    "peer_tuned": "ds_configs/peer_zero3_tuned.json",
    "peer_stock": "ds_configs/peer_zero3_stock.json",
}


def arm_section(arm: str, **changes) -> PlanSection:
    """The plan settings of `arm`, with `changes` on top (e.g. budget=0.6, or expert ranks for MoE)."""
    return PlanSection(**{**ARMS[arm], **changes})


def arm_overrides(arm: str) -> list[str]:
    """The `plan.key=value` overrides that give a `launch/train.py` job the plan settings of `arm`."""
    return [f"plan.{key}={value}" for key, value in ARMS[arm].items()]


def model_config(shape: str, layers: int | None = None):
    """The transformers config of a shape from SHAPES; `layers`: fewer decoder layers of the same widths."""
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def write_config(shape: str, directory: Path, layers: int | None = None) -> dict:
    """config.json only, for jobs that build random weights themselves (model.random_init: straight into
    ZeRO-3 partitions, never whole on one rank). Returns the config as written."""
    model_config(shape, layers).save_pretrained(directory)
    return json.loads((Path(directory) / "config.json").read_text())


def random_model(config, *, dtype, device, seed: int = 0):
    """Seeded random weights of `config`, built on `device`, frozen, without the KV cache (training steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def start_logged(cmd: Sequence[str], log: Path, *, cpu: bool) -> subprocess.Popen:
    """Start `cmd` from the checkout's root in the ranks' environment, stdout and stderr into `log`."""
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as handle:  # the child holds its own copy of the file descriptor
        return subprocess.Popen(list(cmd), cwd=ROOT, env=rank_env(cpu), stdout=handle, stderr=subprocess.STDOUT)


def run_logged(cmd: Sequence[str], log: Path, *, cpu: bool, timeout: float) -> None:
    """Run `cmd` to the end (start_logged); a failure exits with the last 40 lines of `log`, a run past
    `timeout` seconds is killed and raises subprocess.TimeoutExpired."""
    proc = start_logged(cmd, log, cpu=cpu)
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"error: run failed (exit {returncode}); log {log}:\n{tail}")


def add_job_args(parser, *, steps: int, micro_batch: int, seq_len: int, probe_batches: int, timeout: float) -> None:
    """The arguments of a benchmark that runs the real job under the DeepSpeed launcher (bench_scale, bench_load);
    `finish_job_args` then reads --gpu-ids into --gpus."""
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--gpu-ids", help="e.g. 2,3: run on these GPUs of this host (sets --gpus)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--micro-batch", type=int, default=micro_batch)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--probe-batches", type=int, default=probe_batches)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero3_70b.json"))
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per run")
    parser.add_argument("--cpu", action="store_true", help="smoke run on CPU ranks over gloo, float32")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra job overrides")


def finish_job_args(args):
    if args.gpu_ids:
        args.gpus = len(args.gpu_ids.split(","))
    return args
