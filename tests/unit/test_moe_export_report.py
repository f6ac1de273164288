"""MoE models: `aletheia-ds export --merge` folds expert adapters on fused banks (PEFT target_parameters) into the
banks, and the merged checkpoint gives base+adapter's logits; the report draws expert heat maps."""

import pytest
import torch
from helpers.families import random_batches, tiny_model

from aletheia_ds.adapters.attach import attach
from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection
from aletheia_ds.merge import export_merged
from aletheia_ds.plan import make_plan
from aletheia_ds.probe.run import run_probe


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merged_moe_model_equals_base_plus_expert_adapter(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_model(family).save_pretrained(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    model.requires_grad_(False)
    layout = describe(model)
    report = run_probe(model, layout, random_batches(2, 2, 12, seed=1), lambda b: model(**b, use_cache=False).loss)
    plan = make_plan(
        report, PlanSection(top_pct=50, attention_r=4, mlp_r=8, expert_r=4, expert_rule="top_k", expert_top_k=2)
    )
    assert plan.experts
    peft_model = attach(model, plan)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for batch in random_batches(3, 2, 12, seed=7):
        peft_model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    export_merged(str(tmp_path / "model"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")), str(tmp_path / "adapter")
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    batch = random_batches(1, 2, 12, seed=8)[0]
    with torch.no_grad():
        want = reference(**batch, use_cache=False).logits
        got = merged(**batch, use_cache=False).logits
        assert not torch.allclose(base(**batch, use_cache=False).logits, want, atol=1e-4)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_report_of_a_moe_run_has_expert_heat_maps(tmp_path, tiny_frozen):
    from aletheia_ds.io import write_json_atomic
    from aletheia_ds.run_report import write_run_report

    model, layout, batches = tiny_frozen("qwen2_moe", batches=(2, 2, 12), seed=1)
    report = run_probe(model, layout, batches, lambda b: model(**b, use_cache=False).loss, model_name="tiny-qwen2-moe")
    plan = make_plan(report, PlanSection(top_pct=50, expert_rule="top_k", expert_top_k=2))
    write_json_atomic(tmp_path / "probe.json", report.to_json())
    write_json_atomic(tmp_path / "plan.json", plan.to_json())
    written = write_run_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert tmp_path / "experts.png" in written and "](experts.png)" in md
    assert (
        f"{len(report.experts)} experts in {len({e.layer for e in report.experts})} MoE layers; "
        f"{sum(e.tokens for e in report.experts)} routed tokens" in md
    )
    for layer, experts in plan.experts_by_layer().items():
        assert f"2 experts r{experts[0].r}" in md
