"""GPU check (skipped without CUDA): the training path, launch/train.py as one process on one GPU."""

import json

import pytest
from helpers.ranks import ROOT, evaluate_tiny_run, read_jsonl, run_train, save_tiny_llama, tiny_run_config

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def test_training_path_on_one_gpu_zero2_bf16_compiled(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model", layers=6)
    out = tmp_path / "run"
    cfg = tiny_run_config(
        model_dir,
        out,
        train={"gradient_checkpointing": True, "compile": True, "max_steps": 8},
        deepspeed={"config": str(ROOT / "ds_configs/zero2.json")},
        plan={"rule": "budget", "budget": 0.7},
    )
    run_train(cfg, tmp_path, nprocs=0, timeout=600, env=rank_env(cpu=False))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rule"] == "budget" and plan["predicted"]["fraction_of_uniform"] <= 0.7
    result = evaluate_tiny_run(model_dir, out, cfg)
    # the run computed in bf16, the reload in float32: equal up to bf16 rounding
    assert result["logits_max_abs_diff"] < 0.1, result
    assert result["adapter_loss"] < result["base_loss"]


def test_liger_fused_loss_under_zero3_matches_unfused(tmp_path):
    """The job on one GPU under ZeRO-3 (liger applied without its fused loss there: kernels.py),
    train.liger=true against false from the same probe and plan: the same losses step by step, within bf16."""
    pytest.importorskip("liger_kernel")
    model_dir = save_tiny_llama(tmp_path / "model", layers=6, family="qwen2")
    runs = {}
    for liger in (False, True):
        out = tmp_path / f"liger_{liger}"
        cfg = tiny_run_config(
            model_dir,
            out,
            train={"liger": liger, "gradient_checkpointing": True, "max_steps": 6},
            **({"probe": {"report": str(tmp_path / "liger_False/probe.json")}} if liger else {}),
        )
        proc = run_train(cfg, tmp_path, nprocs=0, timeout=600, env=rank_env(cpu=False))
        assert f"liger kernels: {'on' if liger else 'off'}" in proc.stdout + proc.stderr
        runs[liger] = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert len(runs[True]) == len(runs[False]) == 6
    for fused, plain in zip(runs[True], runs[False]):
        assert abs(fused - plain) <= 0.02 * abs(plain), (runs[True], runs[False])
