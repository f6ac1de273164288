"""Liger kernels (train.liger): the knob's resolution and refusals on CPU; on a GPU with liger-kernel installed,
loss and LoRA gradients of the patched model against the unpatched one (masked labels, frozen prefix, uniform),
and the model plain again after the patch is removed. The ZeRO-3 job with the fused loss (partitioned LM head):
tests/distributed/test_gpu_training.py."""

import sys

import pytest
import torch
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

from aletheia_ds import kernels
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, PlanSection, TrainSection
from aletheia_ds.execution import ExecutionOptions, prepared
from aletheia_ds.kernels import LIGER_FAMILIES, resolve_liger
from aletheia_ds.plan import make_plan


@pytest.mark.parametrize("installed", [True, False])
def test_liger_auto_is_on_only_on_cuda_for_patched_families_when_installed(monkeypatch, installed):
    monkeypatch.setattr(kernels, "liger_installed", lambda: installed)
    assert resolve_liger("auto", "cuda", "qwen2") is installed
    assert resolve_liger("auto", "cpu", "qwen2") is False
    assert resolve_liger("auto", "cuda", "mixtral") is False  # MoE: its expert forwards are ours to patch
    assert resolve_liger(False, "cuda", "qwen2") is False


@pytest.mark.parametrize(
    "device, family, installed, message",
    [
        ("cpu", "qwen2", True, "its kernels are Triton GPU kernels and this run is on cpu"),
        (
            "cuda",
            "gpt_neox",
            True,
            r"model type 'gpt_neox' is not one it patches here \(llama, mistral, qwen2, qwen3\)",
        ),
        (
            "cuda",
            "qwen3_moe",
            True,
            r"model type 'qwen3_moe' is not one it patches here \(llama, mistral, qwen2, qwen3\)",
        ),
        ("cuda", "llama", False, r"liger-kernel is not installed \(pip install 'aletheia-ds\[liger\]'\)"),
    ],
)
def test_liger_true_where_it_cannot_run_is_refused(monkeypatch, device, family, installed, message):
    monkeypatch.setattr(kernels, "liger_installed", lambda: installed)
    with pytest.raises(ConfigError, match=rf"^train.liger=true: {message}; set train.liger=auto or false$"):
        resolve_liger(True, device, family)


def test_liger_knob_values():
    assert TrainSection().liger == "auto"
    assert TrainSection(liger=True).liger is True and TrainSection(liger="false").liger is False
    with pytest.raises(ConfigError, match="train.liger"):
        TrainSection(liger="sometimes")


def budget_plan(layout):
    plan = make_plan(fake_report(layout, [0.1, 0.1, 5, 1, 4, 3]), PlanSection(top_pct=66, attention_r=4, mlp_r=8))
    assert plan.lowest_adapted_layer == 2
    return plan


def uniform_plan(layout):
    return make_plan(fake_report(layout, [1.0] * 6), PlanSection(rule="all", attention_r=4, mlp_r=4))


def loss_and_grads(model, layout, plan, batch, options):
    with prepared(model, plan, layout, options) as run:
        run.peft_model.train()
        loss = run.peft_model(**batch, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in run.peft_model.named_parameters() if p.requires_grad}
        fused = run.liger.fused_loss if run.liger is not None else False
    return loss.detach(), grads, fused


@pytest.mark.gpu
@pytest.mark.parametrize("family", LIGER_FAMILIES)
@pytest.mark.parametrize("plan_kind", ["budget", "uniform"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_liger_matches_unfused_loss_and_lora_grads(family, plan_kind, checkpointing):
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(family, num_hidden_layers=6).cuda()
    layout = describe(model)
    plan = budget_plan(layout) if plan_kind == "budget" else uniform_plan(layout)
    # right padding, pad labels -100 and a masked prompt span: the fused loss must ignore the same tokens
    batch = {k: v.cuda() for k, v in random_batches(1, 3, 32, seed=11)[0].items()}
    modeling = sys.modules[type(model).__module__]
    rope_before = modeling.apply_rotary_pos_emb
    plain = loss_and_grads(model, layout, plan, batch, ExecutionOptions(checkpointing=checkpointing))
    fused = loss_and_grads(model, layout, plan, batch, ExecutionOptions(checkpointing=checkpointing, liger=True))
    assert fused[2], "liger did not patch the loss"
    assert torch.allclose(fused[0], plain[0], rtol=1e-5, atol=1e-6), (fused[0], plain[0])
    assert fused[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        assert torch.allclose(fused[1][name], grad, rtol=1e-3, atol=1e-6), name
    # removed: module globals, instance forwards and the loss are the plain model's again
    assert modeling.apply_rotary_pos_emb is rope_before
    assert "forward" not in vars(model) and all("forward" not in vars(m) for m in model.modules())
    again = loss_and_grads(model, layout, plan, batch, ExecutionOptions(checkpointing=checkpointing))
    assert torch.equal(again[0], plain[0])
