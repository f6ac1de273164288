"""Expert LoRA on the routed tokens (aletheia_ds/adapters/routed.py) against PEFT's bank-delta forward it replaces:
the same adapters attached with `lora.expert_forward=peft` are the reference (outputs and every LoRA gradient)."""

import pytest
import torch
from helpers.families import MOE, random_batches, tiny_model

from aletheia_ds.adapters import routed
from aletheia_ds.adapters.attach import attach, keep_planned_experts_only
from aletheia_ds.adapters.routed import grouped_mm, routed_expert_modules
from aletheia_ds.arch import describe
from aletheia_ds.config import LoraSection, PlanSection
from aletheia_ds.plan import make_plan
from aletheia_ds.probe.run import run_probe


def plan_for(family: str, expert_rule: str, rank: int = 4):
    model = tiny_model(family)
    model.requires_grad_(False)
    batches = random_batches(2, 2, 12, seed=1)
    report = run_probe(model, describe(model), batches, lambda b: model(**b, use_cache=False).loss)
    section = PlanSection(
        top_pct=50, attention_r=rank, mlp_r=rank, expert_r=rank, expert_rule=expert_rule, expert_top_k=2
    )
    return make_plan(report, section)


def adapted(family: str, plan, expert_forward: str, dtype=torch.float32):
    """The plan's adapters with non-zero B factors (B starts at zero, which would hide A's gradient)."""
    peft_model = attach(tiny_model(family, dtype=dtype), plan, LoraSection(expert_forward=expert_forward))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
        keep_planned_experts_only(peft_model, plan)  # unplanned experts' blocks back to zero
    return peft_model


def step(peft_model, batch):
    out = peft_model(**batch, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("expert_rule", ["top_k", "all"])
@pytest.mark.parametrize("family", list(MOE))
def test_routed_expert_lora_equals_peft_bank_deltas(family, expert_rule):
    plan = plan_for(family, expert_rule)
    batch = random_batches(1, 2, 12, seed=9)[0]
    reference = adapted(family, plan, "peft")
    assert routed_expert_modules(reference) == []
    want_logits, want_grads = step(reference, batch)
    tuned = adapted(family, plan, "routed")
    assert routed_expert_modules(tuned) == [
        plan.module_name(layer, plan.moe[layer].experts_path) for layer in sorted(plan.experts_by_layer())
    ]
    logits, grads = step(tuned, batch)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    expert_grads = [n for n in grads if ".experts." in n]
    assert expert_grads and all(want_grads[n].abs().max() > 0 for n in expert_grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, want_grads[name], rtol=1e-4, atol=1e-7), name


def test_unplanned_experts_get_no_lora_work(monkeypatch):
    """The LoRA products see exactly the (token, k) rows routed to planned experts, grouped per planned expert."""
    plan = plan_for("qwen3_moe", "top_k")
    tuned = adapted("qwen3_moe", plan, "routed")
    layers = tuned.get_base_model().model.layers
    routed_ids, lora_calls = {}, []
    num_experts = next(iter(plan.moe.values())).num_experts
    for layer in plan.experts_by_layer():
        layers[layer].mlp.gate.register_forward_hook(
            lambda _m, _i, out, layer=layer: routed_ids.__setitem__(layer, out[2].flatten())
        )

    def spy(x, w, offsets):
        if w.shape[0] < num_experts:  # the base products group over every expert, LoRA over the planned
            lora_calls.append((x.shape[0], w.shape[0]))
        return grouped_mm(x, w, offsets)

    monkeypatch.setattr(routed, "grouped_mm", spy)
    with torch.no_grad():
        tuned(**random_batches(1, 2, 12, seed=9)[0], use_cache=False)
    want = []
    for layer, experts in plan.experts_by_layer().items():
        planned = torch.tensor([e.expert for e in experts])
        rows = int(torch.isin(routed_ids[layer], planned).sum())
        assert 0 < rows < routed_ids[layer].numel()  # some routed rows go to unplanned experts
        want += [(rows, len(experts))] * 4  # two banks, two products each
    assert lora_calls == want


def test_torch_grouped_kernel_equals_the_loop_forward_and_backward(monkeypatch):
    """torch's grouped matmul (run here on CPU in bf16) and the fallback loop, empty groups included."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    offsets = counts.cumsum(0).to(torch.int32)
    x0 = torch.randn(int(counts.sum()), 16, generator=g).bfloat16()
    w0 = torch.randn(len(counts), 24, 16, generator=g).bfloat16().transpose(1, 2)  # (E, in, out) as banks are read
    results = {}
    for kernel in ("grouped", "loop"):
        monkeypatch.setattr(routed, "FORCE_KERNEL", kernel)
        calls = []
        monkeypatch.setattr(routed, "_loop_mm", lambda *a, f=routed._loop_mm: calls.append(1) or f(*a))
        x, w = x0.clone().requires_grad_(True), w0.detach().clone().requires_grad_(True)
        y = grouped_mm(x, w, offsets)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).bfloat16())
        assert bool(calls) == (kernel == "loop")
        results[kernel] = (y.float(), x.grad.float(), w.grad.float())
    reference = torch.cat(
        [x0[s:e].float() @ w0[i].float() for i, (s, e) in enumerate(zip([0, *offsets[:-1]], offsets))]
    )
    assert torch.allclose(results["loop"][0], reference, rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(results["grouped"], results["loop"]):
        assert torch.allclose(ours, theirs, rtol=2e-2, atol=2e-2)


def test_grouped_kernel_path_in_bf16_matches_peft(monkeypatch):
    """The whole model in bf16 with torch's grouped kernel: PEFT's bank deltas within bf16 rounding."""
    monkeypatch.setattr(routed, "FORCE_KERNEL", "grouped")
    plan = plan_for("mixtral", "top_k", rank=8)  # rank 8: 16-byte rows in bf16
    batch = random_batches(1, 2, 12, seed=9)[0]
    want_logits, want_grads = step(adapted("mixtral", plan, "peft", torch.bfloat16), batch)
    calls = []
    monkeypatch.setattr(
        routed, "_TORCH_GROUPED_MM", lambda *a, f=routed._TORCH_GROUPED_MM, **k: calls.append(1) or f(*a, **k)
    )
    logits, grads = step(adapted("mixtral", plan, "routed", torch.bfloat16), batch)
    assert calls
    assert (logits.float() - want_logits.float()).abs().max() < 0.05
    for name, grad in grads.items():
        rel = (grad.float() - want_grads[name].float()).norm() / want_grads[name].float().norm().clamp_min(1e-12)
        assert rel < 0.05, (name, float(rel))


def test_disabled_and_merged_adapters_run_peft_s_path():
    plan = plan_for("olmoe", "top_k")
    batch = random_batches(1, 2, 12, seed=9)[0]
    tuned = adapted("olmoe", plan, "routed")
    with torch.no_grad():
        base = tiny_model("olmoe")(**batch, use_cache=False).logits
        adapted_logits = tuned(**batch, use_cache=False).logits
        assert not torch.allclose(adapted_logits, base, atol=1e-4)
        with tuned.disable_adapter():
            assert torch.allclose(tuned(**batch, use_cache=False).logits, base, atol=1e-5)
        tuned.merge_adapter()  # the banks now hold W + BA: adding the LoRA terms again would count them twice
        assert torch.allclose(tuned(**batch, use_cache=False).logits, adapted_logits, atol=1e-5)
