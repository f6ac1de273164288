"""Cost model: prediction structure, calibration recovers known coefficients, budgeted selection."""

import pytest
from helpers.reports import SHAPES, known_model, report_with

from aletheia_ds.config import ConfigError, PlanSection
from aletheia_ds.cost import CostModel, measurement_plans
from aletheia_ds.plan import make_plan, select_within_budget


def test_depth_is_paid_down_to_the_lowest_adapted_layer_only():
    cost = known_model()
    one_top = [(7, 16, 64, 64)]
    one_bottom = [(0, 16, 64, 64)]
    assert cost.predict(one_bottom) - cost.predict(one_top) == pytest.approx(7 * 0.004)
    # more adapters above the lowest layer add only their own cost
    two = [(0, 16, 64, 64), (5, 16, 64, 64)]
    assert cost.predict(two) - cost.predict(one_bottom) == pytest.approx(0.0003 + 1e-7 * 16 * 128)


def test_fit_recovers_the_coefficients_of_synthetic_timings():
    truth = known_model()
    measured = [(adapters, truth.predict(adapters)) for adapters in measurement_plans(8, SHAPES).values()]
    fitted = CostModel.fit(measured, [1.0] * 8, SHAPES, checkpointing=False, tokens_per_step=256)
    for name in ("base_s", "depth_s", "adapter_fixed_s", "adapter_width_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert max(abs(r) for r in fitted.fit_residuals) < 1e-9


def test_budget_plan_respects_budget_and_prefers_high_cut_when_depth_dominates():
    report = report_with([8, 7, 6, 5, 4, 3, 2, 1])  # the lowest layers score highest, as on random models
    cost = known_model(depth_s=0.02)
    plan = select_within_budget(report, PlanSection(rule="budget", budget=0.6), cost)
    assert plan.predicted["fraction_of_uniform"] <= 0.6 + 1e-12
    paper = make_plan(report, PlanSection(rule="top_pct", top_pct=50), cost)
    assert paper.layers == [0, 1, 2, 3] and paper.predicted["fraction_of_uniform"] > 0.6
    assert plan.lowest_adapted_layer > 0  # the depth cost pushes the cut up
    # no other cut fits more energy in the same budget: brute force over contiguous upper spans
    assert plan.score_captured >= max(
        make_plan(report, PlanSection(rule="upper", top_pct=100 * k / 8), cost).score_captured
        for k in range(1, 9)
        if make_plan(report, PlanSection(rule="upper", top_pct=100 * k / 8), cost).predicted["fraction_of_uniform"]
        <= 0.6
    )


def test_budget_takes_low_layers_when_depth_is_cheap():
    report = report_with([8, 7, 6, 5, 4, 3, 2, 1])
    cost = known_model(depth_s=1e-6, base_s=0.005)
    plan = select_within_budget(report, PlanSection(rule="budget", budget=0.6), cost)
    assert plan.lowest_adapted_layer == 0


def test_budget_below_cheapest_plan_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"plan.budget=0.01 is below the cheapest possible plan"):
        select_within_budget(report_with([1] * 8), PlanSection(rule="budget", budget=0.01), known_model())


def test_analytic_model_is_usable_and_round_trips(tmp_path):
    report = report_with([3, 2, 1, 1, 1, 1, 1, 1])
    cost = CostModel.analytic(report, checkpointing=True)
    assert cost.uniform_seconds() > cost.predict([(7, 16, 64, 64)]) > 0
    cost.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == cost
    plan = make_plan(report, PlanSection(rule="budget", budget=0.7), cost)
    assert plan.predicted["fraction_of_uniform"] <= 0.7 + 1e-12 and plan.predicted["checkpointing"]


def test_budget_granularity_layer_takes_whole_layers_and_module_may_split():
    report = report_with([8, 7, 6, 5, 4, 3, 2, 1])
    cost = known_model(depth_s=0.02)
    whole = select_within_budget(report, PlanSection(rule="budget", budget=0.6), cost)
    per_layer = {}
    for m in whole.modules:
        per_layer.setdefault(m.layer, set()).add(m.key)
    assert all(keys == set(SHAPES) for keys in per_layer.values())
    split = select_within_budget(report, PlanSection(rule="budget", budget=0.6, granularity="module"), cost)
    assert split.score_captured >= whole.score_captured  # finer choices can only fit more energy
    assert split.predicted["fraction_of_uniform"] <= 0.6 + 1e-12


@pytest.mark.parametrize("lowest", [0, 2])
def test_lora_step_flops_match_torch_flop_counter(lowest):
    """MFU's numerator against torch's own count of the matrix products of a real LoRA step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from aletheia_ds.cost import lora_step_flops_per_token

    hidden, inter, layers, vocab, heads, kv, seq, batch, r = 64, 160, 4, 320, 4, 2, 24, 2, 4
    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model,
        LoraConfig(r=r, target_modules=targets, lora_dropout=0.0, layers_to_transform=list(range(lowest, layers))),
    )
    head_dim = hidden // heads
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (batch * seq)
    matmul_params = sum(i * o for i, o in shapes.values())
    adapters = [(layer, r, i, o) for layer in range(lowest, layers) for i, o in shapes.values()]
    formula = lora_step_flops_per_token([matmul_params] * layers, hidden, vocab, seq, adapters)
    # what the formula counts and autograd skips: the input gradients of the lowest adapted layer's q/k/v
    # projections (base and LoRA), whose input (the frozen embeddings' or a frozen layer's output) needs none
    skipped = sum(2 * shapes[m][0] * shapes[m][1] + 2 * r * shapes[m][0] for m in ("q_proj", "k_proj", "v_proj"))
    assert formula - counted == pytest.approx(skipped, rel=0.01)
