"""tools/bench_scale.py end to end on 2 CPU ranks (the real job per arm), and its all-gather accounting."""

import json
import math
import statistics
import subprocess
import sys

import pytest
from helpers.ranks import ROOT

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def tiny_bench_cmd(out) -> list[str]:
    """tools/bench_scale.py on the tiny shape, 2 CPU ZeRO-3 ranks, 3 steps after 1 of warm-up."""
    args = "--shape tiny --gpus 2 --cpu --steps 3 --warmup 1 --micro-batch 2 --seq-len 64"
    return [sys.executable, "tools/bench_scale.py", *args.split(), "--out", str(out)]


@pytest.mark.timeout(1200)  # four job arms in two calls
def test_arms_side_by_side_on_two_zero3_ranks(tmp_path):
    out = tmp_path / "scale"
    cmd = [
        *tiny_bench_cmd(out),
        "--arms",
        "uniform",
        "budget",
        "--link-rate",
        "--link-mb",
        "1",
        "--set",
        "plan.budget=0.7",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    arms = {a["arm"]: a for a in result["arms"]}
    assert set(arms) == {"uniform", "budget"} and not result["failed"]
    for name, arm in arms.items():
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert arm["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
        # the median of the steps after the warm-up, all ranks' tokens shared by 2 GPUs
        assert arm["tokens_per_s_per_gpu"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in rows[1:]) / 2)
        plan = json.loads((out / name / "plan.json").read_text())
        assert arm["lowest_adapted_layer"] == plan["lowest_adapted_layer"] and arm["adapters"] == len(plan["modules"])
        assert arm["base_held_fraction_by_rank"] == [0.5, 0.5]  # zero.Init: half the base weights per rank
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
    assert arms["uniform"]["layers_adapted"] == 6 and "probe" in arms["uniform"]["seconds"]
    assert "probe" not in arms["budget"]["seconds"]  # the budget arm reused the first arm's probe.json
    assert "| budget (budget) |" in (out / "scale.md").read_text()
    # a later call into the same directory adds an arm, reusing the probe; the earlier arms stay
    proc = subprocess.run(
        cmd[: cmd.index("--arms")] + ["--arms", "paper", "uniform:train.no_recompute_layers=3"],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    assert [a["arm"] for a in result["arms"]] == ["uniform", "budget", "paper", "uniform:train.no_recompute_layers=3"]
    assert "probe" not in result["arms"][2]["seconds"]
    # an arm with a lever of its own: the top 3 layers keep their activations, the losses stay the uniform arm's
    variant = out / "uniform_train.no_recompute_layers_3"
    assert "recompute: the top 3 adapted layers keep their activations" in (variant / "log.txt").read_text()
    losses = {
        name: [json.loads(line)["loss"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("uniform", variant.name)
    }
    assert losses[variant.name] == pytest.approx(losses["uniform"], rel=1e-6)
    assert json.loads((out / "paper" / "probe.json").read_text()) == json.loads(
        (out / "uniform" / "probe.json").read_text()
    )


def test_all_gather_volume_counts_the_partitioned_weights():
    from _common import SHAPES
    from bench_scale import all_gather_bytes_per_step
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES["tiny"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    model = AutoModelForCausalLM.from_config(config)
    threshold = 10_000
    partitioned = sum(p.numel() for p in model.parameters() if p.numel() > threshold)
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters() if p.numel() > threshold)
    head = model.lm_head.weight.numel()
    cfg = config.to_dict()
    # forward only (nothing adapted), one rank of two receives half of every gathered weight
    assert all_gather_bytes_per_step(cfg, None, 2, 2, threshold, True, reuse=True) == partitioned * 2 / 2
    # layers 4 and 5 adapted: their weights and the head are gathered again in backward (and a third time
    # for the recompute when the gathered copy is not kept)
    reused = all_gather_bytes_per_step(cfg, 4, 2, 2, threshold, True, reuse=True)
    assert reused == (partitioned + 2 * per_layer + head) * 2 / 2
    assert all_gather_bytes_per_step(cfg, 4, 2, 2, threshold, True, reuse=False) == reused + 2 * per_layer * 2 / 2
    assert all_gather_bytes_per_step(cfg, 4, 4, 2, threshold, True, reuse=True) == reused * 2 * 3 / 4


@pytest.mark.slow
def test_peer_arms_run_trainer_peft_zero3_in_the_same_table(tmp_path):
    """The peer arms (tools/peer_trainer.py: transformers Trainer + PEFT + ZeRO-3) through the launcher, next to
    nothing else: every layer's seven linears at r16, trained, a finite loss, in scale.json and scale.md."""
    out = tmp_path / "scale"
    cmd = [
        *tiny_bench_cmd(out),
        "--arms",
        "peer_tuned",
        "peer_stock",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    arms = {a["arm"]: a for a in result["arms"]}
    assert set(arms) == {"peer_tuned", "peer_stock"} and not result["failed"]
    for name, arm in arms.items():
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and arm["steps"] == 3
        assert arm["tokens_per_s_per_gpu"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in rows[1:]) / 2)
        assert arm["tokens_per_s_per_gpu"] > 0 and arm["mfu"] > 0
        assert all(math.isfinite(r["loss"]) for r in rows)
        lora = arm["lora"]
        assert lora["layers"] == list(range(6)) and lora["ranks"] == [16]
        assert lora["modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert arm["adapters"] == lora["adapters_trained"] == 6 * 7  # every lora_B moved from its zero start
        assert arm["base_held_fraction_by_rank"] == [0.5, 0.5]  # built under zero.Init by transformers
        assert f"| {name} (trainer+peft) | 6 (0) | 42 |" in (out / "scale.md").read_text()
    # the stock config's "auto" fields were filled by the Trainer from the model's width (64)
    assert arms["peer_stock"]["resolved_zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert arms["peer_tuned"]["resolved_zero_optimization"]["stage3_param_persistence_threshold"] == 2_000_000
