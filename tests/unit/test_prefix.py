"""Frozen-prefix execution: nothing saved below the lowest adapted layer; loss and LoRA grads unchanged."""

import copy

import pytest
import torch
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

from aletheia_ds.adapters.attach import attach
from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection
from aletheia_ds.execution import FrozenPrefix, base_model
from aletheia_ds.plan import make_plan


class SavedByLayer:
    """Per decoder layer: tensors autograd saves while it runs, and forward calls during backward (recomputes).

    Inside a checkpointed region the checkpoint's own saved-tensor hooks take over, so with checkpointing
    the recompute count is what shows whether backward reached a layer. Recomputes are counted on the
    layer's attention block: depending on the transformers version, checkpointing replays the layer's
    `forward` (its own hooks do not fire again) or its `__call__`.
    """

    def __init__(self, layers):
        self.current = None
        self.counts = {}
        self.recomputes = {}
        self.in_backward = False
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=index: setattr(self, "current", i))
            layer.register_forward_hook(lambda *_a: setattr(self, "current", None))
            attention = getattr(layer, "self_attn", None) or getattr(layer, "attention")
            attention.register_forward_pre_hook(lambda _m, _a, i=index: self._attention(i))

    def _attention(self, index):
        self.current = index
        if self.in_backward:
            self.recomputes[index] = self.recomputes.get(index, 0) + 1

    def pack(self, tensor):
        if self.current is not None:
            self.counts[self.current] = self.counts.get(self.current, 0) + 1
        return tensor

    def run(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            return fn()


def prepared(family, lowest_layer, checkpointing, standard_recipe):
    model = tiny_model(family, num_hidden_layers=6)
    layout = describe(model)
    scores = [0.1] * 6
    scores[lowest_layer] = 5.0
    scores[5] = 4.0
    plan = make_plan(fake_report(layout, scores), PlanSection(top_pct=33, attention_r=4, mlp_r=8))
    assert plan.lowest_adapted_layer == lowest_layer
    peft_model = attach(model, plan)
    base = base_model(peft_model)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if standard_recipe:
        base.enable_input_require_grads()  # what HF Trainer + PEFT do with checkpointing
    peft_model.train()
    return peft_model, layout, plan


def step(model, batch, tracker=None):
    loss = model(**batch, use_cache=False).loss
    if tracker is not None:
        tracker.in_backward = True
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_prefix_saves_nothing_below_the_cut_and_keeps_gradients(family, checkpointing):
    batch = random_batches(1, 2, 10, seed=7)[0]
    plain, layout, plan = prepared(family, 3, checkpointing, standard_recipe=True)
    fast = copy.deepcopy(plain)
    FrozenPrefix(fast, layout.layers_path, plan.lowest_adapted_layer).apply()

    plain_layers = base_model(plain).get_submodule(layout.layers_path)
    fast_layers = base_model(fast).get_submodule(layout.layers_path)
    plain_saved, fast_saved = SavedByLayer(plain_layers), SavedByLayer(fast_layers)
    loss_plain, grads_plain = plain_saved.run(lambda: step(plain, batch, plain_saved))
    loss_fast, grads_fast = fast_saved.run(lambda: step(fast, batch, fast_saved))

    assert torch.equal(loss_plain, loss_fast)
    assert grads_plain.keys() == grads_fast.keys() and grads_plain
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_fast[name], rtol=1e-5, atol=1e-7), name
    below = range(plan.lowest_adapted_layer)
    lowest = plan.lowest_adapted_layer
    assert all(fast_saved.counts.get(i, 0) == 0 for i in below), fast_saved.counts
    assert all(fast_saved.recomputes.get(i, 0) == 0 for i in below), fast_saved.recomputes
    if checkpointing:
        # backward recomputes the adapted span only; the standard recipe recomputes the prefix too
        assert fast_saved.recomputes.get(lowest, 0) == 1
        assert all(plain_saved.recomputes.get(i, 0) == 1 for i in below), plain_saved.recomputes
    else:
        assert fast_saved.counts.get(lowest, 0) > 0
        # the standard recipe does save (and backprop through) the prefix: the checks above can fail
        assert any(plain_saved.counts.get(i, 0) > 0 for i in below), plain_saved.counts


def test_no_autograd_node_below_the_cut():
    model, layout, plan = prepared("qwen2", 2, False, standard_recipe=True)
    FrozenPrefix(model, layout.layers_path, plan.lowest_adapted_layer).apply()
    layers = base_model(model).get_submodule(layout.layers_path)
    outputs = {}
    for index, layer in enumerate(layers):
        layer.register_forward_hook(
            lambda _m, _a, out, i=index: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    model(**random_batches(1, 2, 8)[0], use_cache=False).loss.backward()
    for index in range(plan.lowest_adapted_layer):
        assert outputs[index].grad_fn is None and not outputs[index].requires_grad
    assert outputs[plan.lowest_adapted_layer].grad_fn is not None


def test_remove_restores_the_plain_path():
    model, layout, plan = prepared("llama", 2, True, standard_recipe=False)
    layers = base_model(model).get_submodule(layout.layers_path)
    handle = FrozenPrefix(model, layout.layers_path, plan.lowest_adapted_layer).apply()
    assert "forward" in layers[0].__dict__ and not layers[0].gradient_checkpointing
    handle.remove()
    assert "forward" not in layers[0].__dict__ and layers[0].gradient_checkpointing


def test_prefix_cache_replays_exactly_and_skips_the_prefix():
    from aletheia_ds.data import Example, collate
    from aletheia_ds.execution import PrefixCache

    model, layout, plan = prepared("llama", 3, False, standard_recipe=False)
    FrozenPrefix(model, layout.layers_path, plan.lowest_adapted_layer).apply()
    g = torch.Generator().manual_seed(0)
    rows = [Example(ids, ids) for ids in (torch.randint(3, 96, (n,), generator=g).tolist() for n in (7, 12, 9, 5))]
    reference = []
    for order in ([0, 1], [2, 3], [3, 0], [1, 2]):  # "epoch 2" regroups the examples differently
        reference.append(step(model, collate([rows[i] for i in order], 0)))
    cache = PrefixCache(model, layout.layers_path, plan.lowest_adapted_layer).apply()
    layers = base_model(model).get_submodule(layout.layers_path)
    ran = []
    hook = layers[0].self_attn.register_forward_pre_hook(lambda *_a: ran.append(1))
    replays = []
    for order, (loss_ref, grads_ref) in zip(([0, 1], [2, 3], [3, 0], [1, 2]), reference):
        batch = collate([rows[i] for i in order], 0)
        replays.append(cache.begin(order, batch["attention_mask"]))
        calls_before = len(ran)
        loss, grads = step(model, batch)
        assert (len(ran) == calls_before) == replays[-1]  # replay: layer 0 never runs
        assert torch.allclose(loss, loss_ref, rtol=1e-6)
        for name in grads_ref:
            assert torch.allclose(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7), name
    assert replays == [False, False, True, True]
    assert cache.stored_bytes == sum(len(r.input_ids) for r in rows) * 32 * 4
    cache.begin(None)
    hook.remove()
    cache.remove()
    assert "forward" in layers[0].__dict__  # the frozen prefix's wrapper is back in place


def test_prefix_cache_refuses_dropout_in_the_prefix():
    from aletheia_ds.execution import PrefixCache

    model = tiny_model("gpt_neox", num_hidden_layers=4, hidden_dropout=0.1)
    layout = describe(model)
    plan = make_plan(fake_report(layout, [0.1, 0.1, 5, 4]), PlanSection(top_pct=50))
    with pytest.raises(ValueError, match="dropout is active in the frozen prefix"):
        PrefixCache(attach(model, plan), layout.layers_path, plan.lowest_adapted_layer)
