"""GPU check (skipped without CUDA): compiled adapted span equals eager. The training path on one GPU is in
tests/distributed/test_gpu_training.py."""

import copy

import pytest
import torch
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

from aletheia_ds.adapters.attach import attach
from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection
from aletheia_ds.execution import FrozenPrefix, base_model, compile_adapted_layers
from aletheia_ds.plan import make_plan

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
