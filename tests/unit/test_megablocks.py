"""megablocks dMoE layers (GPU only): per-expert probe, expert plan and per-expert LoRA on the fused w1/v1/w2 banks.

    pytest -q -m gpu tests/unit/test_megablocks.py

A tiny Llama whose MLPs are megablocks `dMoE(mlp_type="glu", mlp_impl="grouped")` (grouped_gemm, bf16 only;
`mlp_impl="sparse"` refuses triton >= 3.2). Checks:
  - the probe's per-expert loop reproduces dMoE's own forward, and its scores equal brute-force autograd
    on the fused banks: to 1e-4 in float32 (the loop alone: grouped_gemm is bf16-only) and to bf16 precision
    against megablocks' own grouped-GEMM backward;
  - a plan's experts get per-expert LoRA (aletheia_ds/adapters/experts.py), training changes exactly them, and the
    adapter saved beside PEFT's reloads (PeftModel.from_pretrained + load_expert_adapter) to the same logits.
"""

import pytest
import torch

megablocks = pytest.importorskip("megablocks", reason="megablocks is not installed (extra [megablocks]; GPU only)")
pytest.importorskip("grouped_gemm", reason="grouped_gemm is not installed (megablocks mlp_impl='grouped' needs it)")

pytestmark = pytest.mark.gpu

HIDDEN, FFN, EXPERTS, TOP_K = 128, 256, 4, 2


def megablocks_llama(seed: int = 0, dtype=torch.bfloat16):
    import torch.nn.functional as F
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    args = Arguments(
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_num_experts=EXPERTS,
        moe_top_k=TOP_K,
        mlp_type="glu",
        mlp_impl="grouped",
        activation_fn=F.silu,
        bias=False,
        return_bias=False,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        moe_loss_weight=0.0,
        device=torch.cuda.current_device(),
    )
    for layer in model.model.layers:
        layer.mlp = dMoE(args)
    model.cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.requires_grad_(False)
    return model.eval()


def cuda_batches(count=2, seed=1):
    from helpers.families import random_batches

    return [{k: v.cuda() for k, v in b.items()} for b in random_batches(count, 2, 16, seed=seed)]


def test_layout_is_found():
    from aletheia_ds.arch import describe

    layout = describe(megablocks_llama())
    assert sorted(layout.moe) == [0, 1, 2]
    block = layout.moe[0]
    assert (block.style, block.router_path, block.num_experts, block.top_k) == ("megablocks", "mlp.router.layer", 4, 2)
    assert [(b.name, b.in_features, b.out_features) for b in block.banks] == [
        ("w1", HIDDEN, FFN),
        ("v1", HIDDEN, FFN),
        ("w2", FFN, HIDDEN),
    ]
    assert not any("router" in t.path for targets in layout.layer_targets for t in targets)


def test_probe_loop_reproduces_dmoe_and_equals_brute_force():
    from helpers.moe_reference import assert_experts_match

    from aletheia_ds.arch import describe
    from aletheia_ds.probe.experts import ExpertProbe
    from aletheia_ds.probe.run import run_probe

    model = megablocks_llama()
    layout = describe(model)
    batches = cuda_batches()
    # 1. the probe's per-expert loop computes what dMoE computes (bf16 rounding apart)
    with torch.no_grad():
        own = model(**batches[0]).logits.float()
        with ExpertProbe(model, layout).attached():
            looped = model(**batches[0]).logits.float()
    assert torch.allclose(looped, own, atol=3e-2, rtol=3e-2), float((looped - own).abs().max())

    # 2. float32: hooks == autograd through the same loop (weights unfrozen, .grad sliced per expert)
    model32 = model.float()
    report = run_probe(model32, layout, batches, lambda b: model32(**b).loss)
    reference = brute_force_in_loop(model32, layout, batches)
    assert_experts_match(report, reference, rtol=1e-4, check_tokens=False)
    assert sum(e.tokens for e in report.layer_experts(0)) == TOP_K * sum(
        int(b["attention_mask"].sum()) for b in batches
    )

    # 3. bf16: hooks == megablocks' own grouped-GEMM backward, to bf16 precision
    model16 = megablocks_llama()
    report16 = run_probe(model16, layout, batches, lambda b: model16(**b).loss)
    from helpers.moe_reference import brute_force_moe

    assert_experts_match(report16, brute_force_moe(model16, layout, batches), rtol=5e-2, check_tokens=False)


def brute_force_in_loop(model, layout, batches):
    from helpers.moe_reference import brute_force_moe

    from aletheia_ds.probe.experts import ExpertProbe

    with ExpertProbe(model, layout).attached():  # megablocks' grouped GEMM is bf16-only: autograd through the loop
        return brute_force_moe(model, layout, batches)


def test_expert_lora_trains_only_planned_experts_and_reloads(tmp_path):
    from peft import PeftModel

    from aletheia_ds.adapters.attach import attach, expert_deltas
    from aletheia_ds.adapters.experts import load_expert_adapter
    from aletheia_ds.adapters.export import export_adapter
    from aletheia_ds.arch import describe
    from aletheia_ds.config import PlanSection
    from aletheia_ds.dist import DistContext
    from aletheia_ds.plan import make_plan
    from aletheia_ds.probe.run import run_probe

    model = megablocks_llama()
    layout = describe(model)
    report = run_probe(model, layout, cuda_batches(), lambda b: model(**b).loss)
    plan = make_plan(report, PlanSection(rule="all", expert_rule="top_k", expert_top_k=2, expert_r=8, attention_r=4))
    planned = {(e.layer, e.expert) for e in plan.experts}
    assert len(planned) == 2 * 3
    tuned = attach(model, plan)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for batch in cuda_batches(4, seed=5):
        tuned(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()
    live = {
        (int(name.split(".")[2]), e)
        for name, norms in expert_deltas(tuned).items()
        for e, norm in enumerate(norms)
        if norm > 0
    }
    assert live == planned
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    export_adapter(ctx, tuned, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "expert_adapter.json").is_file()
    batch = cuda_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = tuned(**batch).logits.float()
    reloaded = PeftModel.from_pretrained(megablocks_llama(), str(tmp_path / "adapter"))
    assert len(load_expert_adapter(reloaded, tmp_path / "adapter")) == 3 * 3  # w1, v1, w2 of 3 layers
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits.float(), expected, atol=1e-2)
