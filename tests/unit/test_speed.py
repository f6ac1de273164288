"""The timing harness attaches and removes adapters in place and calibrates a usable cost model."""

import torch
from helpers.families import tiny_model

from aletheia_ds.adapters.attach import adapter_modules
from aletheia_ds.arch import describe
from aletheia_ds.cost import measurement_plans
from aletheia_ds.speed import calibrate, random_batch, shapes_to_plan, time_plan


def test_time_plan_leaves_the_base_model_untouched_and_calibration_fits():
    model = tiny_model("llama", num_hidden_layers=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    layout = describe(model)
    batch = random_batch(2, 16, 96)
    plans = measurement_plans(layout.num_layers, layout.shapes())
    plan = shapes_to_plan(layout, plans["upper_half_r16"], "upper")
    assert plan.layers == [2, 3] and len(plan.modules) == 14
    for checkpointing in (False, True):
        timing = time_plan(model, layout, plan, batch, steps=2, warmup=1, checkpointing=checkpointing)
        assert timing.median_s > 0 and torch.isfinite(torch.tensor(timing.loss))
        assert not adapter_modules(model)
        after = dict(model.named_parameters())
        assert before.keys() == after.keys()
        assert all(torch.equal(before[n], after[n]) and not after[n].requires_grad for n in before)
    cost = calibrate(model, layout, batch, steps=2, warmup=1, log=lambda _m: None)
    assert cost.calibrated and cost.base_s >= 0 and cost.uniform_seconds() > 0
