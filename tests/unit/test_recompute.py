"""Partial recompute (train.no_recompute_layers): the top adapted layers keep their activations, the rest recompute;
loss and LoRA gradients equal those of plain autograd without checkpointing; the activation estimate matches what
autograd saves."""

import pytest
import torch
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, PlanSection, TrainSection
from aletheia_ds.cost import layer_activation_bytes, layers_without_recompute
from aletheia_ds.execution import ExecutionOptions, prepared
from aletheia_ds.plan import make_plan


def budget_plan(model):
    """Layers 2..5 of 6 adapted (lowest 2): a frozen prefix below, an adapted span above."""
    layout = describe(model)
    plan = make_plan(fake_report(layout, [0.1, 0.1, 5, 1, 4, 3]), PlanSection(top_pct=66, attention_r=4, mlp_r=8))
    assert plan.lowest_adapted_layer == 2
    return layout, plan


def step(peft_model, batch, layers):
    """Loss, LoRA gradients, and which decoder layers ran their forward again during backward (recompute)."""
    recomputed, in_backward = set(), [False]
    handles = [
        layer.self_attn.register_forward_pre_hook(lambda *_a, i=i: recomputed.add(i) if in_backward[0] else None)
        for i, layer in enumerate(layers)
    ]
    peft_model.train()
    loss = peft_model(**batch, use_cache=False).loss
    in_backward[0] = True
    loss.backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, recomputed


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("no_recompute", [0, 2, 4])
def test_partial_recompute_keeps_loss_and_grads(family, no_recompute):
    batch = random_batches(1, 2, 16, seed=5)[0]
    results = {}
    for name, options in {
        "plain": ExecutionOptions(checkpointing=False),
        "partial": ExecutionOptions(checkpointing=True, no_recompute_layers=no_recompute),
    }.items():
        model = tiny_model(family, num_hidden_layers=6)
        layout, plan = budget_plan(model)
        with prepared(model, plan, layout, options) as run:
            results[name] = step(run.peft_model, batch, run.base.get_submodule(layout.layers_path))
    (loss, grads, recomputed), (ref_loss, ref_grads, ref_recomputed) = results["partial"], results["plain"]
    assert ref_recomputed == set()
    # the top `no_recompute` adapted layers of 2..5 keep their activations; the frozen prefix never recomputes
    assert recomputed == set(range(2, 6 - no_recompute))
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-7), name


def test_set_recompute_between_steps_and_undo():
    model = tiny_model("llama", num_hidden_layers=6)
    layout, plan = budget_plan(model)
    batch = random_batches(1, 2, 16, seed=6)[0]
    with prepared(model, plan, layout, ExecutionOptions(checkpointing=True)) as run:
        layers = run.base.get_submodule(layout.layers_path)
        first = step(run.peft_model, batch, layers)
        run.peft_model.zero_grad(set_to_none=True)
        assert run.set_recompute(3) == [3, 4, 5]
        second = step(run.peft_model, batch, layers)
    assert first[2] == {2, 3, 4, 5} and second[2] == {2}
    assert torch.equal(first[0], second[0])
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_activation_estimate_matches_what_autograd_saves(family):
    """The bytes one uncheckpointed adapted layer saves for backward (distinct storages, weights aside) against
    cost.layer_activation_bytes: within 15% at SDPA attention (the estimate leaves out the norms' per-token
    statistics and the rotary tables, small against the hidden-sized terms)."""
    hidden, inter, batch_size, seq = 64, 160, 2, 32
    model = tiny_model(
        family, num_hidden_layers=2, hidden_size=hidden, intermediate_size=inter, attn_implementation="sdpa"
    )
    layout = describe(model)
    plan = make_plan(fake_report(layout, [1.0, 1.0]), PlanSection(rule="all", attention_r=16, mlp_r=16))
    batch = {"input_ids": torch.randint(3, 96, (batch_size, seq)), "labels": torch.randint(3, 96, (batch_size, seq))}
    with prepared(model, plan, layout, ExecutionOptions()) as run:
        run.peft_model.train()
        layer = run.base.get_submodule(layout.layers_path)[1]
        inside, saved = [False], {}
        layer.register_forward_pre_hook(lambda *_a: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda *_a: inside.__setitem__(0, False))

        def pack(tensor):
            if inside[0]:
                storage = tensor.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run.peft_model(**batch, use_cache=False)
        weights = {p.untyped_storage().data_ptr() for p in run.peft_model.parameters()}
        measured = sum(size for pointer, size in saved.items() if pointer not in weights)
    config = model.config
    kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    estimate = layer_activation_bytes(hidden, inter, kv_dim, batch_size * seq, dtype_bytes=4, lora_ranks=7 * 16)
    assert 0.85 < estimate / measured < 1.15, (estimate, measured)


def test_layers_without_recompute():
    gib = 2**30
    assert layers_without_recompute(30 * gib, 2 * gib, 80) == 12  # 30 / (2 x 1.25)
    assert layers_without_recompute(30 * gib, 2 * gib, 5) == 5  # no more than the adapted span
    assert layers_without_recompute(-1 * gib, 2 * gib, 80) == 0  # over the device already
    assert layers_without_recompute(1 * gib, 2 * gib, 80) == 0


def test_no_recompute_layers_knob():
    assert TrainSection().no_recompute_layers == 0
    assert TrainSection(no_recompute_layers="auto").no_recompute_layers == "auto"
    assert TrainSection(no_recompute_layers=12).no_recompute_layers == 12
    with pytest.raises(ConfigError, match="train.no_recompute_layers"):
        TrainSection(no_recompute_layers=-1)
    with pytest.raises(ConfigError, match="train.no_recompute_layers"):
        TrainSection(no_recompute_layers="some")
