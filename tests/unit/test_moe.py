"""Mixture of experts on one process: per-expert probe vs brute-force autograd, expert-aware plans, expert LoRA."""

import json
import math

import pytest
import torch
from helpers.families import MOE, random_batches, tiny_model, with_list_experts
from helpers.moe_reference import assert_experts_match, brute_force_moe
from helpers.probe_reference import assert_scores_equal, brute_force_scores

from aletheia_ds.adapters.attach import adapter_modules, attach, expert_deltas, verify_adapters
from aletheia_ds.adapters.peft_config import lora_config_fields, save_plan
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, PlanSection
from aletheia_ds.plan import Plan, make_plan
from aletheia_ds.probe.report import ExpertScore, LayerScore, ProbeReport
from aletheia_ds.probe.run import run_probe

MOE_FAMILIES = list(MOE)


def probe(model, layout, batches, checkpointing: bool = False):
    return run_probe(model, layout, batches, lambda b: model(**b, use_cache=False).loss, checkpointing=checkpointing)


# ---------------------------------------------------------------- probe
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_probe_equals_brute_force(family, tiny_frozen):
    model, layout, batches = tiny_frozen(family, batches=(3, 2, 12), seed=1)
    assert layout.moe, "no MoE layer found"
    report = probe(model, layout, batches)
    # no weight gradient, nothing unfrozen, the experts' own forward back in place
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    for _, block, layer in layout.iter_moe(model):
        assert "forward" not in vars(layer.get_submodule(block.experts_path))
    assert_experts_match(report, brute_force_moe(model, layout, batches))
    # routing load: every real token goes to top_k experts in every MoE layer
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for layer, block in layout.moe.items():
        assert sum(e.tokens for e in report.layer_experts(layer)) == block.top_k * real_tokens
    # the linears are still measured exactly, and a layer's score now includes its experts' energy
    assert_scores_equal(
        ProbeReport.from_sq_norms(
            {(x.index, k): v * v * len(batches) for x in report.layers for k, v in x.modules.items()},
            batches=len(batches),
            num_layers=report.num_layers,
            model="",
            tokens=0,
            seconds=0.0,
        ),
        brute_force_scores(model, layout, batches),
    )
    for x in report.layers:
        energy = sum(v * v for v in x.modules.values()) + sum(e.score**2 for e in report.layer_experts(x.index))
        assert x.score == pytest.approx(math.sqrt(energy), rel=1e-12)


def test_expert_probe_under_reentrant_checkpointing_matches(tiny_frozen):
    model, layout, batches = tiny_frozen("mixtral", batches=(2, 2, 10), seed=3)
    reference = brute_force_moe(model, layout, batches)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert_experts_match(probe(model, layout, batches), reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_probe_with_its_own_checkpointing_matches(family, tiny_frozen):
    """Experts are measured once per pass (hook in the first run, input from the recompute), as brute force says."""
    model, layout, batches = tiny_frozen(family, batches=(2, 2, 10), seed=3)
    reference = brute_force_moe(model, layout, batches)
    report = probe(model, layout, batches, checkpointing=True)
    assert_experts_match(report, reference)
    plain = probe(model, layout, batches)
    assert [e.tokens for e in report.experts] == [e.tokens for e in plain.experts]  # routing load counted once


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_checkpointed_expert_probe_holds_one_layers_expert_inputs_at_a_time(family, tiny_frozen):
    """The first run keeps no expert input; the recompute supplies them during that layer's backward."""
    from aletheia_ds.probe.experts import ExpertProbe
    from aletheia_ds.probe.hooks import CheckpointPhase

    model, layout, (batch,) = tiny_frozen(family, batches=(1, 2, 10), seed=4)
    per_layer = max(b.num_experts * len(b.banks) + 1 for b in layout.moe.values())  # banks of every expert + router
    held = {}
    for checkpointing in (True, False):
        phase = CheckpointPhase()
        experts = ExpertProbe(model, layout, phase=phase)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=phase.checkpoint_kwargs())
        model.train()
        with experts.attached():
            embeds = model.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
            model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
            ).loss.backward()
        model.gradient_checkpointing_disable()
        assert not experts.pending and float(experts.sq_norms.sum()) > 0 and float(experts.router_sq.min()) > 0
        held[checkpointing] = experts.max_pending
    assert 0 < held[True] <= per_layer < held[False]  # plain: every MoE layer's inputs until its backward


def test_probe_json_carries_experts_and_routers(tmp_path, tiny_frozen):
    model, layout, batches = tiny_frozen("qwen2_moe", batches=(2, 2, 8), seed=4)
    report = probe(model, layout, batches)
    blob = json.loads(json.dumps(report.to_json()))
    assert {"layer", "expert", "score", "tokens"} <= set(blob["experts"][0])
    assert set(blob["routers"]) == {"0", "1", "2", "3"}
    assert blob["layout"]["moe"]["0"]["banks"][0][:2] == ["gate_up_proj", "mlp.experts.gate_up_proj"]
    again = ProbeReport.from_json(blob)
    assert again.experts == report.experts and again.routers == report.routers
    from aletheia_ds.run_report import plot_experts

    assert plot_experts(again, tmp_path / "experts.png").stat().st_size > 0


def test_unknown_moe_layout_names_classes_and_the_fix():
    model = with_list_experts(tiny_model("qwen3_moe"))
    with pytest.raises(
        ConfigError,
        match=r"has experts \(config.num_(local_)?experts=4\) but its MoE layout is not known; "
        r"classes in the last decoder layer's MLP block: .*ListExpertsMoe.*"
        r"aletheia_ds/arch.py find_moe_block",
    ):
        describe(model)


# ---------------------------------------------------------------- plans
def moe_report(layout, expert_scores: dict[int, list[float]], tokens: dict[int, list[int]], module_score=1.0):
    """A probe report with given per-expert scores and loads (everything else module_score)."""
    layers = [
        LayerScore(i, 0.0, {t.key: module_score for t in layout.layer_targets[i]}) for i in range(layout.num_layers)
    ]
    report = ProbeReport(
        model="m",
        num_layers=layout.num_layers,
        tokens=100,
        seconds=0.0,
        batches=1,
        layers=layers,
        layout=layout.to_json(),
    )
    experts = [
        ExpertScore(layer, e, score, tokens[layer][e])
        for layer, scores in expert_scores.items()
        for e, score in enumerate(scores)
    ]
    return report.add_experts(experts, {layer: 0.1 for layer in expert_scores})


@pytest.fixture(scope="module")
def qwen2_moe_layout():
    return describe(tiny_model("qwen2_moe"))


def test_expert_rules_pick_by_score_energy_and_load(qwen2_moe_layout):
    scores = {0: [0.1, 0.1, 0.1, 0.1], 1: [3.0, 1.0, 2.0, 0.5], 2: [0.1] * 4, 3: [4.0, 0.0, 0.0, 1.0]}
    loads = {0: [1, 1, 1, 1], 1: [5, 40, 30, 25], 2: [1] * 4, 3: [60, 0, 0, 40]}
    report = moe_report(qwen2_moe_layout, scores, loads)

    def chosen(**kw):
        return {
            layer: sorted(e.expert for e in group)
            for layer, group in make_plan(report, PlanSection(top_pct=50, **kw)).experts_by_layer().items()
        }

    assert make_plan(report, PlanSection(top_pct=50)).layers == [1, 3]  # expert energy decides the layers
    assert chosen(expert_rule="top_k", expert_top_k=2) == {1: [0, 2], 3: [0, 3]}
    # energy 0.8: layer 1 has 9+1+4+0.25 = 14.25; 9 < 11.4 <= 9+4
    assert chosen(expert_rule="energy", expert_energy=0.8) == {1: [0, 2], 3: [0]}
    assert chosen(expert_rule="load", expert_top_k=2) == {1: [1, 2], 3: [0, 3]}
    assert chosen(expert_rule="all") == {1: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    assert chosen(expert_rule="none") == {}
    plan = make_plan(report, PlanSection(top_pct=50, expert_rule="top_k", expert_top_k=1, expert_r=8))
    energy = sum(s * s for x in report.layers for s in x.modules.values()) + sum(e.score**2 for e in report.experts)
    planned = sum(1.0 for _ in plan.modules) + 9.0 + 16.0
    assert plan.score_captured == pytest.approx(planned / energy)
    assert {(e.layer, e.expert): (e.r, e.alpha, e.token_share) for e in plan.experts} == {
        (1, 0): (8, 16.0, 0.05),
        (3, 0): (8, 16.0, 0.6),
    }


def test_attention_shared_experts_and_routers_follow_their_knobs(qwen2_moe_layout):
    report = moe_report(qwen2_moe_layout, {i: [1.0, 2.0, 3.0, 4.0] for i in range(4)}, {i: [1] * 4 for i in range(4)})

    def keys(plan):
        return {(m.layer, m.key) for m in plan.modules}

    default = make_plan(report, PlanSection(top_pct=25))
    assert default.layers == [0] and ("0", "q_proj") not in keys(default)
    assert {k for _, k in keys(default)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "shared_expert.gate_proj",
        "shared_expert.up_proj",
        "shared_expert.down_proj",
    }
    assert default.routers == []
    no_attention = make_plan(report, PlanSection(top_pct=25, moe_attention=False, shared_experts="none"))
    assert keys(no_attention) == set() and no_attention.layers == [0] and no_attention.experts
    everywhere = make_plan(report, PlanSection(top_pct=25, shared_experts="all_moe_layers", routers="lora", router_r=2))
    assert {layer for layer, key in keys(everywhere) if key.startswith("shared_expert.")} == {0, 1, 2, 3}
    assert everywhere.layers == [0, 1, 2, 3]
    assert [(m.layer, m.path, m.r) for m in everywhere.routers] == [(0, "mlp.gate.weight", 2)]


def test_moe_plan_round_trips_and_lists_its_peft_fields(qwen2_moe_layout, tmp_path):
    report = moe_report(qwen2_moe_layout, {i: [1.0, 2.0, 3.0, 4.0] for i in range(4)}, {i: [1] * 4 for i in range(4)})
    plan = make_plan(
        report,
        PlanSection(
            top_pct=50, expert_rule="top_k", expert_top_k=2, expert_r=4, mlp_r=8, attention_r=8, routers="lora"
        ),
    )
    save_plan(plan, tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.experts == plan.experts and again.routers == plan.routers and again.moe == plan.moe
    fields = json.loads((tmp_path / "plan.json").read_text())["lora_config"]
    layer = plan.layers[0]
    assert f"model.layers.{layer}.mlp.experts.gate_up_proj" in fields["target_parameters"]
    assert f"model.layers.{layer}.mlp.shared_expert.down_proj.weight" in fields["target_parameters"]
    assert f"model.layers.{layer}.mlp.gate.weight" in fields["target_parameters"]
    assert fields["target_modules"] == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda b: b["experts"].__setitem__(0, {**b["experts"][0], "expert": 9}),
            r"plan.json: expert 9 of layer \d does not exist \(layer \d has 4 experts: 0..3\)",
        ),
        (
            lambda b: b["experts"].__setitem__(0, {**b["experts"][0], "layer": 7}),
            r"plan.json: layers \[7\] do not exist \(the model has 4: 0..3\)",
        ),
        (
            lambda b: b["moe"].pop(str(b["experts"][0]["layer"])),
            r"plan.json: experts or a router planned in layer \d, which is not a MoE layer",
        ),
    ],
)
def test_plan_naming_missing_expert_or_layer_is_one_clear_error(qwen2_moe_layout, edit, match):
    report = moe_report(qwen2_moe_layout, {i: [1.0, 2.0, 3.0, 4.0] for i in range(4)}, {i: [1] * 4 for i in range(4)})
    blob = make_plan(report, PlanSection(top_pct=50, expert_rule="top_k")).to_json()
    edit(blob)
    blob["layers"] = sorted({m["layer"] for m in blob["modules"]} | {e["layer"] for e in blob["experts"]})
    with pytest.raises(ConfigError, match=match) as err:
        Plan.from_json(blob)
    assert "\n" not in str(err.value)


def test_plan_for_another_model_is_refused_before_attaching():
    model = tiny_model("qwen3_moe")
    layout = describe(model)
    report = moe_report(layout, {i: [1.0, 2.0, 3.0, 4.0] for i in range(4)}, {i: [1] * 4 for i in range(4)})
    plan = make_plan(report, PlanSection(top_pct=50, expert_rule="all"))
    fewer = tiny_model("qwen3_moe", num_experts=2)
    with pytest.raises(
        ConfigError,
        match=r"plan: expert 3 of layer \d does not exist \(the model's layer \d has 2 "
        r"experts: 0..1\)",
    ):
        attach(fewer, plan)


# ---------------------------------------------------------------- expert-level LoRA
def expert_plan(family, **settings):
    model = tiny_model(family)
    model.requires_grad_(False)
    layout = describe(model)
    report = probe(model, layout, random_batches(2, 2, 12, seed=1))
    return model, make_plan(
        report,
        PlanSection(
            **{
                "top_pct": 50,
                "attention_r": 4,
                "mlp_r": 8,
                "expert_r": 4,
                "expert_rule": "top_k",
                "expert_top_k": 2,
                **settings,
            }
        ),
    )


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_lora_trains_exactly_the_planned_experts_and_reloads_with_peft(family, tmp_path):
    from peft import PeftModel

    model, plan = expert_plan(family)
    assert plan.experts
    peft_model = attach(model, plan)
    found = adapter_modules(peft_model)
    for layer, experts in plan.experts_by_layer().items():
        for bank in plan.moe[layer].banks:
            assert found[f"model.layers.{layer}.{bank.path}"] == (4, 8.0)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for batch in random_batches(3, 2, 12, seed=7):
        peft_model(**batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    verify_adapters(peft_model, plan)  # unplanned experts' blocks are still exactly zero
    planned = {(e.layer, e.expert) for e in plan.experts}

    def live(deltas):
        return {(int(name.split(".")[2]), e) for name, norms in deltas.items() for e, n in enumerate(norms) if n > 0}

    assert live(expert_deltas(peft_model)) == planned
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    batch = random_batches(1, 2, 12, seed=8)[0]
    with torch.no_grad():
        expected = peft_model(**batch, use_cache=False).logits
    reloaded = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "adapter"))
    assert live(expert_deltas(reloaded)) == planned
    assert adapter_modules(reloaded) == adapter_modules(peft_model)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch, use_cache=False).logits, expected, atol=1e-5)


def test_verify_reports_an_adapter_on_an_unplanned_expert():
    model, plan = expert_plan("olmoe")
    peft_model = attach(model, plan)
    layer, experts = next(iter(plan.experts_by_layer().items()))
    unplanned = next(e for e in range(4) if e not in {x.expert for x in experts})
    wrapper = next(
        m
        for n, m in peft_model.named_modules()
        if n.endswith(f"layers.{layer}.mlp.experts") and hasattr(m, "parameter_name")
    )
    with torch.no_grad():
        wrapper.lora_A["default"].weight.view(4, 4, -1)[unplanned] = 1.0
    with pytest.raises(
        ConfigError, match=rf"experts\.{wrapper.parameter_name} has adapters on experts \[.*{unplanned}"
    ):
        verify_adapters(peft_model, plan)


def test_dense_mlp_and_shared_experts_of_moe_models_are_exact_despite_peft_renames():
    """PEFT rewrites target_modules like 'mlp.down_proj' into every expert bank for DeepSeek-style models;
    the plan names those weights as parameters, so layer 0's dense MLP and the shared experts get exactly
    their planned adapters."""
    model, plan = expert_plan("deepseek_v3", rule="all", expert_rule="none")
    fields = lora_config_fields(plan)
    assert "model.layers.0.mlp.down_proj.weight" in fields["target_parameters"]
    assert not any(".experts." in name for name in fields["target_parameters"])
    found = adapter_modules(attach(model, plan))
    assert found["model.layers.0.mlp.down_proj.weight"] == (8, 16.0)
    assert found["model.layers.1.mlp.shared_experts.up_proj.weight"] == (8, 16.0)
    assert not any(".experts." in name for name in found)


def test_cost_model_counts_expert_adapters_by_their_tokens():
    from aletheia_ds.cost import CostModel, expert_adapters

    model, plan = expert_plan("mixtral")
    report = probe(model, describe(model), random_batches(2, 2, 12, seed=1))
    adapters = expert_adapters(plan)
    layer, experts = next(iter(plan.experts_by_layer().items()))
    gate_up = next(a for a in adapters if a[0] == layer)
    assert gate_up[1] == pytest.approx(sum(4 * e.token_share for e in experts))
    assert gate_up[2:] == (32, 96)
    cost = CostModel.analytic(report)
    assert cost.predict(cost.plan_adapters(plan)) > cost.predict(
        cost.plan_adapters(Plan(plan.rule, plan.num_layers, plan.layers_path, plan.layers, plan.modules, 0.0))
    )


# ---------------------------------------------------------------- per-expert LoRA on 2-D (megablocks-layout) banks
def test_expert_lora_parametrization_adds_each_planned_experts_delta_and_round_trips(tmp_path):
    """aletheia_ds.adapters.experts on a bank laid out as megablocks keeps it: (E*F, H), expert e owns rows e*F.."""
    from aletheia_ds.adapters.experts import CONFIG_FILE, add_expert_lora, expert_lora_deltas, load_expert_adapter
    from aletheia_ds.adapters.export import save_expert_adapter

    num_experts, ffn, hidden = 4, 6, 5
    torch.manual_seed(0)
    host = torch.nn.Module()
    host.mlp = torch.nn.Module()
    host.mlp.w1 = torch.nn.Parameter(torch.randn(num_experts * ffn, hidden), requires_grad=False)
    host.mlp.w2 = torch.nn.Parameter(torch.randn(num_experts * ffn, hidden), requires_grad=False)
    base_w1, base_w2 = host.mlp.w1.detach().clone(), host.mlp.w2.detach().clone()
    spec = dict(num_experts=num_experts, experts=[1, 3], r=2, alpha=4.0)
    w1 = add_expert_lora(host, "mlp.w1", {**spec, "in_features": hidden, "out_features": ffn, "transposed": False})
    w2 = add_expert_lora(host, "mlp.w2", {**spec, "in_features": ffn, "out_features": hidden, "transposed": True})
    assert torch.equal(host.mlp.w1, base_w1)  # B starts at zero
    with torch.no_grad():
        for lora in (w1, w2):
            lora.lora_B.normal_()
    for lora, weight, base in ((w1, host.mlp.w1, base_w1), (w2, host.mlp.w2, base_w2)):
        per_expert = weight.view(num_experts, ffn, hidden)
        for row, expert in enumerate([1, 3]):
            delta = 2.0 * lora.lora_B[row] @ lora.lora_A[row]  # (out, in) of the expert's linear map
            want = base.view(num_experts, ffn, hidden)[expert] + (delta.T if lora.transposed else delta)
            assert torch.allclose(per_expert[expert], want, atol=1e-6)
        for expert in (0, 2):
            assert torch.equal(per_expert[expert], base.view(num_experts, ffn, hidden)[expert])
    norms = expert_lora_deltas(host)
    assert [n > 0 for n in norms["mlp.w1"]] == [False, True, False, True]
    state = {name: p.detach() for name, p in host.named_parameters() if "lora_" in name}
    assert save_expert_adapter(host, tmp_path, state) and (tmp_path / CONFIG_FILE).is_file()
    fresh = torch.nn.Module()
    fresh.mlp = torch.nn.Module()
    fresh.mlp.w1 = torch.nn.Parameter(base_w1.clone(), requires_grad=False)
    fresh.mlp.w2 = torch.nn.Parameter(base_w2.clone(), requires_grad=False)
    assert load_expert_adapter(fresh, tmp_path) == ["mlp.w1", "mlp.w2"]
    assert torch.equal(fresh.mlp.w1, host.mlp.w1) and torch.equal(fresh.mlp.w2, host.mlp.w2)


# ---------------------------------------------------------------- the megablocks probe loop, on CPU
class _MegablocksLayoutExperts(torch.nn.Module):
    """What the probe reads of megablocks' ParallelDroplessMLP (GLU): `mlp.w1/v1/w2` (E*F, H), `args`, `bias`.

    Its own forward is an independent dense formula (every token through its top-k experts by einsum), the
    reference the probe's per-expert loop must reproduce; real megablocks runs in tests/unit/test_megablocks.py
    (GPU).
    """

    def __init__(self, experts=4, ffn=6, hidden=8):
        from types import SimpleNamespace

        super().__init__()
        self.num_experts, self.bias = experts, None
        self.args = SimpleNamespace(activation_fn=torch.nn.functional.silu, return_bias=False)
        self.mlp = torch.nn.Module()
        for name in ("w1", "v1", "w2"):
            setattr(self.mlp, name, torch.nn.Parameter(torch.randn(experts * ffn, hidden) * 0.3, requires_grad=False))

    def forward(self, x, scores, expert_weights, top_experts):
        n, h = self.num_experts, x.shape[-1]
        w1, v1, w2 = (getattr(self.mlp, k).view(n, -1, h)[top_experts] for k in ("w1", "v1", "w2"))  # (T, k, F, H)
        tokens = x.reshape(-1, h)
        act = torch.nn.functional.silu(torch.einsum("th,tkfh->tkf", tokens, w1)) * torch.einsum(
            "th,tkfh->tkf", tokens, v1
        )
        return torch.einsum("tkf,tkfh,tk->th", act, w2, expert_weights).view(x.shape)


def test_megablocks_probe_loop_reproduces_the_layout_and_equals_brute_force():
    from aletheia_ds.arch import ExpertBank, Layout, MoeBlock
    from aletheia_ds.probe.experts import ExpertProbe

    torch.manual_seed(0)
    hidden, ffn, experts, top_k = 8, 6, 4, 2
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.router = torch.nn.Module()
    layer.mlp.router.layer = torch.nn.Linear(hidden, experts, bias=False)
    layer.mlp.experts = _MegablocksLayoutExperts(experts, ffn, hidden)
    layer.requires_grad_(False)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    banks = (
        ExpertBank("w1", "mlp.experts.mlp.w1", hidden, ffn),
        ExpertBank("v1", "mlp.experts.mlp.v1", hidden, ffn),
        ExpertBank("w2", "mlp.experts.mlp.w2", ffn, hidden),
    )
    layout = Layout(
        "stand-in",
        "layers",
        [[]],
        moe={0: MoeBlock("megablocks", "mlp", "mlp.experts", "mlp.router.layer", experts, top_k, banks, "X")},
    )
    target = torch.randn(3, 5, hidden)

    def loss_of(x):
        logits = layer.mlp.router.layer(x.view(-1, hidden))
        weights, chosen = logits.softmax(-1).topk(top_k, dim=-1)
        return (layer.mlp.experts(x, logits.softmax(-1), weights, chosen) - target).pow(2).mean()

    inputs = [torch.randn(3, 5, hidden) for _ in range(2)]
    # reference: autograd on the banks through the stand-in's own dense formula
    params = {name: getattr(layer.mlp.experts.mlp, name) for name in ("w1", "v1", "w2")}
    params["router"] = layer.mlp.router.layer.weight
    sums = {}
    for x in inputs:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        loss_of(x).backward()
        for name, p in params.items():
            per = p.grad.double().reshape(experts if name != "router" else 1, -1).pow(2).sum(-1)
            sums[name] = sums.get(name, 0) + per
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    probe = ExpertProbe(model, layout)
    with probe.attached():
        for x in inputs:
            loss_of(x.clone().requires_grad_(True)).backward()  # inputs need grad, as embeddings do in run_probe
    scores, routers = probe.scores(probe.local(), len(inputs))
    for e in scores:
        for name in ("w1", "v1", "w2"):
            assert e.banks[name] == pytest.approx(math.sqrt(float(sums[name][e.expert]) / 2), rel=1e-6)
    assert routers[0] == pytest.approx(math.sqrt(float(sums["router"][0]) / 2), rel=1e-6)
    assert sum(e.tokens for e in scores) == top_k * 15 * 2
    # the loop's output equals the stand-in's own forward
    x = inputs[0]
    logits = layer.mlp.router.layer(x.view(-1, hidden))
    weights, chosen = logits.softmax(-1).topk(top_k, dim=-1)
    reference = layer.mlp.experts(x, logits, weights, chosen)
    with probe.attached():
        looped = layer.mlp.experts(x, logits, weights, chosen)
    assert torch.allclose(looped, reference, atol=1e-6)
