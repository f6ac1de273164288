"""Planning rules, plan.json round trip, and LoRA attachment verified module by module."""

import json

import pytest
from helpers.families import FAMILIES, tiny_model
from helpers.reports import fake_report

from aletheia_ds.adapters.attach import adapter_modules, attach, verify_adapters
from aletheia_ds.adapters.peft_config import build_lora_config, lora_config_fields, save_plan
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, PlanSection
from aletheia_ds.plan import Plan, make_plan, select_top_pct


def test_top_pct_keeps_highest_layers_with_ceil_and_ties_to_lower_index():
    layout = describe(tiny_model("llama", num_hidden_layers=5))
    report = fake_report(layout, [1.0, 5.0, 3.0, 5.0, 2.0])
    assert select_top_pct(report, 50) == [1, 2, 3]  # ceil(2.5) = 3
    assert select_top_pct(report, 20) == [1]  # tie between 1 and 3 goes to the lower index
    assert select_top_pct(report, 100) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [0, -5, 100.5])
def test_top_pct_out_of_range(bad):
    with pytest.raises(ValueError, match="top_pct"):
        PlanSection(top_pct=bad)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank must be > 0"):
        PlanSection(attention_r=0)


def test_asymmetric_ranks_and_default_alpha_round_trip(tmp_path):
    layout = describe(tiny_model("llama"))
    report = fake_report(layout, [4.0, 1.0, 3.0, 2.0])
    plan = make_plan(report, PlanSection(top_pct=50, attention_r=16, mlp_r=64))
    assert plan.layers == [0, 2]
    by_kind = {m.kind: (m.r, m.alpha) for m in plan.modules}
    assert by_kind == {"attention": (16, 32.0), "mlp": (64, 128.0)}
    energy = sum(s * s for layer in report.layers for s in layer.modules.values())
    assert plan.score_captured == pytest.approx((16 + 9) / energy)
    save_plan(plan, tmp_path / "plan.json")
    blob = json.loads((tmp_path / "plan.json").read_text())
    assert blob["lora_config"]["layers_to_transform"] == [0, 2]
    assert blob["lora_config"]["rank_pattern"] == {r"mlp\.down_proj": 64, r"mlp\.gate_proj": 64, r"mlp\.up_proj": 64}
    again = Plan.load(tmp_path / "plan.json")
    assert again.modules == plan.modules and again.layers == plan.layers


@pytest.mark.parametrize(
    "scores,match", [([0.0, 0.0, 0.0, 0.0], "zero"), ([1.0, float("nan"), 1.0, 1.0], "non-finite")]
)
def test_degenerate_probe_scores_are_refused(scores, match):
    layout = describe(tiny_model("llama"))
    report = fake_report(layout, [1.0] * 4)
    report.layers[1].modules = {k: scores[1] for k in report.layers[1].modules}
    if match == "zero":
        for layer in report.layers:
            layer.modules = {k: 0.0 for k in layer.modules}
    with pytest.raises(ConfigError, match=match):
        make_plan(report, PlanSection())


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_puts_adapters_exactly_on_the_plan(family):
    model = tiny_model(family)
    layout = describe(model)
    report = fake_report(layout, [1.0, 4.0, 2.0, 3.0])
    plan = make_plan(report, PlanSection(top_pct=50, attention_r=4, mlp_r=8))
    names = {f"{layout.layers_path}.{m.layer}.{m.path}" for m in plan.modules}
    peft_model = attach(model, plan)
    found = adapter_modules(peft_model)
    assert set(found) == names
    for m in plan.modules:
        assert found[f"{layout.layers_path}.{m.layer}.{m.path}"] == (m.r, m.alpha)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_per_layer_module_sets_and_ranks_attach_exactly():
    """A plan with different modules and ranks per layer (what a budgeted plan produces)."""
    model = tiny_model("qwen2")
    layout = describe(model)
    report = fake_report(layout, [1.0, 4.0, 2.0, 3.0])
    plan = make_plan(report, PlanSection(top_pct=50, attention_r=4, mlp_r=8))
    plan.modules = [m for m in plan.modules if not (m.layer == 1 and m.key == "down_proj")]
    plan.modules = [
        m if not (m.layer == 3 and m.key == "q_proj") else type(m)(m.layer, m.key, m.path, m.kind, 2, 5.0)
        for m in plan.modules
    ]
    fields = lora_config_fields(plan)
    assert fields["exclude_modules"] == ["model.layers.1.mlp.down_proj"]
    peft_model = attach(model, plan)
    found = adapter_modules(peft_model)
    assert "model.layers.1.mlp.down_proj" not in found
    assert found["model.layers.3.self_attn.q_proj"] == (2, 5.0)
    assert found["model.layers.1.self_attn.q_proj"] == (4, 8.0)


def test_verify_catches_what_peft_silently_ignores():
    """A rank_pattern key that matches nothing and a wrong layer index are both reported."""
    from peft import get_peft_model

    model = tiny_model("llama")
    layout = describe(model)
    plan = make_plan(fake_report(layout, [1.0, 4.0, 2.0, 3.0]), PlanSection(top_pct=50, attention_r=4, mlp_r=8))
    config = build_lora_config(plan)
    config.rank_pattern = {"mlp_down_proj_typo": 8}  # PEFT ignores it: down_proj ends up at the default rank
    config.layers_to_transform = [0, 1]  # wrong layers
    wrong = get_peft_model(model, config)
    with pytest.raises(ConfigError, match="planned modules got no adapter.*unplanned modules.*wrong rank"):
        verify_adapters(wrong, plan)


def test_unknown_target_module_lists_available():
    with pytest.raises(ConfigError, match=r"\['nope'\] not found; modules of this model: \['down_proj'"):
        describe(tiny_model("llama"), only=["nope", "q_proj"])


def test_plan_naming_missing_layer_is_one_clear_error(tmp_path):
    layout = describe(tiny_model("llama"))
    plan = make_plan(fake_report(layout, [1.0, 4.0, 2.0, 3.0]), PlanSection())
    blob = plan.to_json()
    blob["modules"][0]["layer"] = 99
    blob["layers"] = sorted({m["layer"] for m in blob["modules"]})
    with pytest.raises(ConfigError, match=r"layers \[99\] do not exist \(the model has 4"):
        Plan.from_json(blob)
