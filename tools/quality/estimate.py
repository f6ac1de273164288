"""Expected GPU seconds of each stage for the chosen sizes (printed by `--estimate`; a plan, not a measurement).

Pretraining is FLOP-bound (both bases share the GPU, so the cap is what each gets); LoRA runs of small
models are host-bound (kernel launches), so 8 worker processes overlap on 16 CPU cores until the GPU's
summed kernel time binds. Constants are leads from the previous single-base study (docs/QUALITY.md):
100M parameters, 64 x 512 tokens: 107 ms per pretraining step alone; uniform LoRA at 12 layers, 64 rows:
93 ms per step alone, of which ~25 ms of kernels.
"""

from __future__ import annotations

from tools.quality.pretrain import BASES, SMOKE_BASES
from tools.quality.settings import Settings

H200_BF16_FLOPS = 7.9e14
PRETRAIN_MFU = 0.35
LORA_HOST_S_PER_LAYER = 93e-3 / 12  # launch-bound: host time grows with the layer count, not the width
LORA_KERNEL_S_PER_LAYER = 25e-3 / 12
EVAL_S = 6.0  # test + validation losses, exact-match decoding, corpus loss per run
CURVE_POINT_S = 0.4
PREPARE_S_PER_BASE = 40.0  # probe, calibration, each plan timed alone, base evaluation
SPEED_S = 240.0  # 7B at 28 layers and 72B widths at 12 + 20 layers: builds and ~30 distinct plans


def params(shape: dict, vocab: int) -> int:
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    kv = h * shape["kv_heads"] // shape["heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * vocab * h


def estimate(s: Settings) -> dict:
    shapes = {b: {**BASES, **SMOKE_BASES}[b] for b in s.names("bases")}
    tokens = s.pretrain_batch * s.seq_len
    step_s = {b: 6 * params(sh, s.vocab_size) * tokens / (H200_BF16_FLOPS * PRETRAIN_MFU) for b, sh in shapes.items()}
    shared_step_s = sum(step_s.values())  # side by side: each step waits for the other's kernels
    pretrain_s = min(s.pretrain_max_s, s.pretrain_steps * shared_step_s) + 60.0  # + corpus, tokenizer, saving
    arms = len(s.names("arms"))
    seeds, lrs = len(s.seed_list()), len(s.lr_list())
    runs_per_base = arms * (lrs + seeds - 1)
    run_s = {}
    for b, sh in shapes.items():
        host = s.lora_steps * LORA_HOST_S_PER_LAYER * sh["layers"]  # launch-bound: independent of the batch
        kernels = s.lora_steps * LORA_KERNEL_S_PER_LAYER * sh["layers"] * (sh["hidden"] / 768) ** 2 * s.lora_batch / 64
        run_s[b] = {"host_s": host + EVAL_S + s.curve_points * CURVE_POINT_S, "kernel_s": kernels}
    host_total = sum(runs_per_base * r["host_s"] for r in run_s.values())
    kernel_total = sum(runs_per_base * r["kernel_s"] for r in run_s.values())
    arms_s = max(host_total / s.workers, kernel_total) + PREPARE_S_PER_BASE * len(shapes) + 30.0
    return {
        "pretrain_step_s_alone": step_s,
        "pretrain_steps_in_cap": {b: s.pretrain_max_s / shared_step_s for b in shapes},
        "runs": runs_per_base * len(shapes),
        "run_s": run_s,
        "stages_s": {"pretrain": pretrain_s, "arms": arms_s, "speed": SPEED_S, "report (CPU)": 0.0},
        "arms_calls_of_540_s": arms_s / 540.0,
    }


def print_estimate(result: dict) -> None:
    import json

    print(json.dumps(result, indent=1))
    print("\nexpected GPU seconds per stage:")
    for name, seconds in result["stages_s"].items():
        print(f"  {name:14s} {seconds:7.0f}")
