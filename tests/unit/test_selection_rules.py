"""Signal scores from the probe's sketch against brute-force autograd; the cut-first and pilot rules."""

import math

import pytest
import torch
from helpers.families import FAMILIES, random_batches, tiny_model
from helpers.reports import KINDS, SHAPES

from aletheia_ds.adapters.attach import adapter_modules, attach
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, PlanSection
from aletheia_ds.cost import CostModel
from aletheia_ds.plan import Plan, make_plan, pilot_plan, rank_levels, span_ranks
from aletheia_ds.probe.hooks import sketch_matrix
from aletheia_ds.probe.report import LayerScore, ProbeReport
from aletheia_ds.probe.run import LOWRANK_R, run_probe


# ---------------------------------------------------------------- the sketch against autograd
def per_batch_gradients(model, layout, batches) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Reference: each batch's dL_b/dW of every target linear, by unfreezing the weights and reading .grad."""
    modules = {(layer, t.key): m for layer, t, m in layout.iter_modules(model)}
    for m in modules.values():
        m.weight.requires_grad_(True)
    grads = {key: [] for key in modules}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        for key, m in modules.items():
            grads[key].append(m.weight.grad.detach().double().clone())
    for m in modules.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None
    return grads


def reference_stats(grads: list[torch.Tensor], k: int) -> dict[str, float]:
    """The sketched estimator computed from full gradients with the same Omega: signal^2 = (||sum_b G_b O||^2 -
    sum_b ||G_b O||^2) / (B (B - 1)); lowrank from the spectrum of sum_b G_b O."""
    omega = sketch_matrix(grads[0].shape[1], k).double()
    sketches = [g @ omega for g in grads]
    total = sum(sketches)
    b = len(grads)
    signal_sq = max(0.0, float(total.square().sum() - sum(s.square().sum() for s in sketches)) / (b * (b - 1)))
    singular = torch.linalg.svdvals(total).square()
    share = float(singular[:LOWRANK_R].sum() / singular.sum())
    return {"signal": math.sqrt(signal_sq), "lowrank": math.sqrt(signal_sq * share)}


@pytest.mark.parametrize("family", FAMILIES[:3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sketched_signal_equals_the_estimator_on_autograd_gradients(family, checkpointing):
    model = tiny_model(family)
    model.requires_grad_(False)
    layout = describe(model)
    batches = random_batches(4, 2, 12, seed=3)
    report = run_probe(
        model, layout, batches, lambda b: model(**b, use_cache=False).loss, sketch_dim=8, checkpointing=checkpointing
    )
    grads = per_batch_gradients(model, layout, batches)
    modules = {(layer, t.key): m for layer, t, m in layout.iter_modules(model)}
    for layer in report.layers:
        for key in layer.modules:
            want = reference_stats(grads[(layer.index, key)], 8)
            assert layer.signal[key] == pytest.approx(want["signal"], rel=1e-4, abs=1e-9), (layer.index, key)
            assert layer.lowrank[key] == pytest.approx(want["lowrank"], rel=1e-4, abs=1e-9), (layer.index, key)
            assert layer.weight_norm[key] == pytest.approx(float(modules[(layer.index, key)].weight.norm()), rel=1e-6)
            assert 0 <= layer.lowrank[key] <= layer.signal[key] * (1 + 1e-9)
    again = ProbeReport.from_json(report.to_json())
    assert again.module_scores("signal") == report.module_scores("signal")


def test_signal_estimates_the_mean_gradient_and_removes_batch_noise():
    """With a wide sketch the estimate approaches the exact unbiased ||mean G||^2 from full gradients; on
    copies of one batch (no noise) signal equals the raw score, on unrelated batches it falls below it."""
    model = tiny_model("llama")
    model.requires_grad_(False)
    layout = describe(model)
    one = random_batches(1, 2, 12, seed=5)[0]
    copies = [dict(one) for _ in range(3)]

    def probe(batches, k):
        return run_probe(
            model,
            layout,
            batches,
            lambda b: model(**b, use_cache=False).loss,  # noqa: E731
            sketch_dim=k,
        )

    same = probe(copies, 2048)
    mixed_batches = random_batches(6, 2, 12, seed=6)
    mixed = probe(mixed_batches, 2048)
    grads = per_batch_gradients(model, layout, mixed_batches)
    for layer_same, layer_mixed in zip(same.layers, mixed.layers):
        for key, raw in layer_same.modules.items():
            assert layer_same.signal[key] == pytest.approx(raw, rel=0.1)  # sketch error ~ sqrt(2 / 2048)
            g = grads[(layer_mixed.index, key)]
            total = sum(g)
            exact_sq = float(total.square().sum() - sum(x.square().sum() for x in g)) / (len(g) * (len(g) - 1))
            assert layer_mixed.signal[key] ** 2 == pytest.approx(
                exact_sq, rel=0.25, abs=0.05 * layer_mixed.modules[key] ** 2
            )
            assert layer_mixed.signal[key] < layer_mixed.modules[key]


def test_signal_scores_are_refused_for_a_raw_only_report():
    report = fake_report([1.0, 2.0, 3.0, 4.0])
    report.layers[0].signal.clear()
    with pytest.raises(ConfigError, match="plan.score=signal needs a probe report with signal scores"):
        make_plan(report, PlanSection(rule="top_pct", score="signal"), known_cost(4))


# ---------------------------------------------------------------- cut-first coverage
def fake_report(layer_scores, signal=None) -> ProbeReport:
    layers = []
    signal = signal or layer_scores
    for i, (score, sig) in enumerate(zip(layer_scores, signal)):
        per, per_signal = score / math.sqrt(len(SHAPES)), sig / math.sqrt(len(SHAPES))
        layers.append(
            LayerScore(
                i,
                score,
                {k: per for k in SHAPES},
                {k: per_signal for k in SHAPES},
                {k: per_signal / 2 for k in SHAPES},
                {k: 10.0 * (i + 1) for k in SHAPES},
            )
        )
    layout = {
        "layers_path": "model.layers",
        "module_kinds": KINDS,
        "module_paths": {k: f"x.{k}" for k in SHAPES},
        "module_shapes": SHAPES,
        "layer_params": [1000] * len(layers),
        "hidden_size": 64,
        "vocab_size": 256,
    }
    return ProbeReport(
        model="m",
        num_layers=len(layers),
        tokens=512,
        seconds=0.1,
        batches=2,
        layers=layers,
        layout=layout,
        batch_size=4,
        seq_len=64,
    )


def known_cost(layers: int, **kw) -> CostModel:
    args = dict(
        base_s=0.05,
        depth_s=0.02,
        adapter_fixed_s=0.0003,
        adapter_width_s=1e-7,
        layer_weights=[1.0] * layers,
        module_shapes=SHAPES,
    )
    args.update(kw)
    return CostModel(**args)


def predicted(cost: CostModel, plan: Plan) -> float:
    return cost.predict(cost.plan_adapters(plan))


def test_cut_adapts_every_layer_from_the_lowest_cut_that_meets_the_budget():
    report = fake_report([8, 7, 6, 5, 4, 3, 2, 1])  # scores largest near the embeddings, as raw norms are
    cost = known_cost(8)
    settings = PlanSection(rule="cut", budget=0.6)
    plan = make_plan(report, settings, cost)
    cut = plan.lowest_adapted_layer
    assert plan.layers == list(range(cut, 8))  # no gaps
    assert {(m.layer, m.key) for m in plan.modules} == {(i, k) for i in range(cut, 8) for k in SHAPES}
    target = 0.6 * cost.uniform_seconds()
    assert predicted(cost, plan) <= target
    # one layer lower (same rank rule) would not fit: the cut is the lowest that does
    lower = make_plan(report, PlanSection(rule="cut", budget=1.0), cost)
    assert lower.lowest_adapted_layer < cut
    deeper = make_plan(fake_report([8, 7, 6, 5, 4, 3, 2, 1]), PlanSection(rule="cut", budget=0.6, guard=0.05), cost)
    assert deeper.lowest_adapted_layer < cut  # the guard moved it down, past the budget
    assert plan.predicted["cut"] == cut and plan.predicted["budget_cut"] == cut


def test_cut_is_the_lowest_feasible_one_by_brute_force():
    report = fake_report([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    cost = known_cost(10, adapter_width_s=3e-6)
    for budget in (0.45, 0.55, 0.7, 0.9):
        settings = PlanSection(rule="cut", budget=budget)
        plan = make_plan(report, settings, cost)
        target = budget * cost.uniform_seconds()
        levels = rank_levels(settings.min_r, settings.max_r)
        energy = report.layer_energy("raw")
        feasible = [
            c
            for c in range(10)
            if cost.predict(
                [(i, span_ranks(energy, range(c, 10), levels)[i], *SHAPES[k]) for i in range(c, 10) for k in SHAPES]
            )
            <= target
        ]
        assert plan.lowest_adapted_layer == min(feasible), budget


def test_cut_ranks_follow_the_score_with_rank_stabilised_alpha():
    report = fake_report([1, 1, 1, 1, 1, 1, 1, 1], signal=[0.1, 0.2, 0.3, 0.4, 5.0, 0.5, 9.0, 0.6])
    cost = known_cost(8, depth_s=0.001, adapter_width_s=0.0)  # ranks cost nothing here: every layer fits
    plan = make_plan(report, PlanSection(rule="cut", budget=1.0, score="signal", min_r=16, max_r=64), cost)
    assert plan.layers == list(range(8))
    ranks = {m.layer: m.r for m in plan.modules}
    assert ranks[6] == 64 and ranks[4] == 64 and ranks[0] == 16 and ranks[1] == 16
    assert set(ranks.values()) == {16, 32, 64}
    for m in plan.modules:
        assert m.alpha == pytest.approx(2 * math.sqrt(16 * m.r))  # scale alpha/r = 2 sqrt(16 / r)
    standard = make_plan(report, PlanSection(rule="cut", budget=1.0, score="signal", rank_scaling="standard"), cost)
    assert all(m.alpha == 2 * m.r for m in standard.modules)


def test_cut_budget_below_the_cheapest_plan_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"plan.budget=0.05 is below the cheapest cut plan"):
        make_plan(fake_report([1] * 8), PlanSection(rule="cut", budget=0.05), known_cost(8))
    with pytest.raises(ConfigError, match="plan.min_r=64 is above plan.max_r=16"):
        make_plan(fake_report([1] * 8), PlanSection(rule="cut", min_r=64, max_r=16), known_cost(8))


def test_cut_plan_attaches_with_its_per_layer_ranks_and_alphas(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    layout = describe(model)
    layers = []
    for index in range(6):
        keys = [t.key for t in layout.layer_targets[index]]
        scores = {k: float(index + 1) for k in keys}
        layers.append(
            LayerScore(
                index, math.sqrt(len(keys)) * (index + 1), scores, dict(scores), dict(scores), {k: 1.0 for k in keys}
            )
        )
    report = ProbeReport(
        model="m",
        num_layers=6,
        tokens=10,
        seconds=0.1,
        batches=2,
        layers=layers,
        layout=layout.to_json(),
        batch_size=2,
        seq_len=12,
    )
    plan = make_plan(
        report, PlanSection(rule="cut", budget=0.8, score="signal", min_r=4, max_r=16), CostModel.analytic(report)
    )
    assert len({m.r for m in plan.modules}) > 1
    plan.save(tmp_path / "plan.json")
    peft_model = attach(model, Plan.load(tmp_path / "plan.json"))  # verifies every rank and alpha
    found = adapter_modules(peft_model)
    assert found == {f"model.layers.{m.layer}.{m.path}": (m.r, m.alpha) for m in plan.modules}


# ---------------------------------------------------------------- pilot, then freeze
def test_pilot_plan_keeps_the_part_above_the_cut_and_the_guard_follows_what_the_pilot_learned():
    report = fake_report([1] * 8)
    cost = known_cost(8)
    settings = PlanSection(rule="cut", budget=0.6)
    flat = pilot_plan(report, [1.0] * 8, settings, cost)
    cut = flat.lowest_adapted_layer
    assert flat.rule == "pilot" and flat.layers == list(range(cut, 8))
    assert all(m.r == 16 and m.alpha == 32 for m in flat.modules)
    assert predicted(cost, flat) <= 0.6 * cost.uniform_seconds()
    # a pilot that learned mostly in the bottom layers: the guard keeps them adapted
    bottom_heavy = pilot_plan(report, [9, 9, 1, 1, 1, 1, 1, 1], settings.model_copy(update={"guard": 0.2}), cost)
    assert bottom_heavy.lowest_adapted_layer == 0
    with pytest.raises(ConfigError, match="pilot: 3 layer changes for a model of 8 layers"):
        pilot_plan(report, [1.0] * 3, settings, cost)


def test_transfer_keeps_the_share_below_the_cut_the_gaps_and_the_ranks():
    from aletheia_ds.plan import transfer_plan

    small = fake_report([1] * 8)
    plan = make_plan(small, PlanSection(rule="cut", budget=0.6), known_cost(8))
    large = fake_report([1] * 80)
    moved = transfer_plan(plan, large)
    assert moved.lowest_adapted_layer == plan.lowest_adapted_layer * 10 and moved.layers == list(
        range(moved.lowest_adapted_layer, 80)
    )
    source = {m.layer: m.r for m in plan.modules}
    assert all(m.r == source[m.layer // 10] for m in moved.modules)
    gappy = make_plan(fake_report([5, 1, 5, 1]), PlanSection(rule="top_pct", top_pct=50), known_cost(4))
    assert gappy.layers == [0, 2]
    assert transfer_plan(gappy, fake_report([1] * 8)).layers == [0, 1, 4, 5]
