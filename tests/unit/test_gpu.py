"""GPU checks (skipped without CUDA): compiled adapted span equals eager; the training path on one GPU."""

import copy
import json

import pytest
import torch

from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection
from aletheia_ds.adapters.attach import attach
from aletheia_ds.plan import make_plan
from aletheia_ds.execution import FrozenPrefix, base_model, compile_adapted_layers
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

pytestmark = pytest.mark.gpu


def test_compiled_adapted_span_matches_eager():
    model = tiny_model("llama", num_hidden_layers=6).cuda()
    layout = describe(model)
    plan = make_plan(fake_report(layout, [0.1, 0.1, 5, 1, 4, 3]), PlanSection(top_pct=50, attention_r=4, mlp_r=8))
    eager = attach(model, plan)
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        FrozenPrefix(m, layout.layers_path, plan.lowest_adapted_layer).apply()
        m.train()
    compile_adapted_layers(base_model(compiled), layout.layers_path, plan.lowest_adapted_layer)
    batch = {k: v.cuda() for k, v in random_batches(1, 2, 16, seed=3)[0].items()}
    results = []
    for m in (eager, compiled):
        loss = m(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], rtol=1e-4, atol=1e-6), name


def test_training_path_on_one_gpu_zero2_bf16_compiled(tmp_path):
    from aletheia_ds.evaluate import evaluate_adapter
    from aletheia_ds.launchers.deepspeed import rank_env
    from helpers.ranks import ROOT, run_train, save_tiny_llama, tiny_run_config

    model_dir = save_tiny_llama(tmp_path / "model", layers=6)
    out = tmp_path / "run"
    cfg = tiny_run_config(model_dir, out, train={"gradient_checkpointing": True, "compile": True, "max_steps": 8},
                          deepspeed={"config": str(ROOT / "ds_configs/zero2.json")}, plan={"rule": "budget", "budget": 0.7})
    run_train(cfg, tmp_path, nprocs=0, timeout=600, env=rank_env(cpu=False))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rule"] == "budget" and plan["predicted"]["fraction_of_uniform"] <= 0.7
    result = evaluate_adapter(model=str(model_dir), adapter=str(out / "adapter"), data=cfg["data"]["eval"],
                              tokenizer=cfg["model"]["tokenizer"], seq_len=48, batches=3, batch_size=4,
                              verify_logits=str(out / "sample_logits.safetensors"))
    # the run computed in bf16, the reload in float32: equal up to bf16 rounding
    assert result["logits_max_abs_diff"] < 0.1, result
    assert result["adapter_loss"] < result["base_loss"]
