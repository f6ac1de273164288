"""The hook probe equals brute-force autograd (weights unfrozen, .grad read) for every family."""

import pytest
import torch
from helpers.families import FAMILIES, random_batches, tiny_model
from helpers.probe_reference import assert_scores_equal, brute_force_scores

from aletheia_ds.arch import describe
from aletheia_ds.probe.hooks import weight_grad_sq_norm
from aletheia_ds.probe.report import ProbeReport
from aletheia_ds.probe.run import run_probe


def hook_scores(model, layout, batches, checkpointing: bool = False) -> ProbeReport:
    return run_probe(model, layout, batches, lambda b: model(**b, use_cache=False).loss, checkpointing=checkpointing)


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_equals_brute_force(family, tiny_frozen):
    model, layout, batches = tiny_frozen(family, batches=(3, 2, 12), seed=1)
    report = hook_scores(model, layout, batches)
    # the probe never creates a weight gradient and leaves everything frozen
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert report.num_layers == model.config.num_hidden_layers
    assert report.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert_scores_equal(report, brute_force_scores(model, layout, batches))


def test_gpt_neox_fused_modules_are_targets():
    layout = describe(tiny_model("gpt_neox"))
    assert {t.key for t in layout.layer_targets[0]} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert layout.kinds()["query_key_value"] == "attention" and layout.kinds()["dense_4h_to_h"] == "mlp"


def test_probe_under_reentrant_checkpointing_matches(tiny_frozen):
    model, layout, batches = tiny_frozen("llama", batches=(2, 2, 10), seed=3)
    reference = brute_force_scores(model, layout, batches)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    calls = []
    # a module inside the layer: transformers >= 5.2x checkpoints the layer's forward, not its __call__,
    # so hooks on the layer itself run once either way
    inner = next(m for layer, _, m in layout.iter_modules(model) if layer == 1)
    handle = inner.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    report = hook_scores(model, layout, batches)
    handle.remove()
    # checkpointing really ran: per batch a forward without grad and a recompute with it
    assert calls == [False, True] * len(batches)
    assert_scores_equal(report, reference)
    assert model.training and not any(m.training is False for m in model.modules())  # train mode restored


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_with_its_own_checkpointing_matches(family, tiny_frozen):
    """run_probe(checkpointing=True): non-reentrant, each layer run twice, same scores as brute force."""
    model, layout, batches = tiny_frozen(family, batches=(2, 2, 10), seed=3)
    reference = brute_force_scores(model, layout, batches)
    inner = next(m for layer, _, m in layout.iter_modules(model) if layer == 1)  # see the test above
    calls = []
    handle = inner.register_forward_pre_hook(lambda *_: calls.append(1))
    report = hook_scores(model, layout, batches, checkpointing=True)
    handle.remove()
    assert len(calls) == 2 * len(batches)  # a forward and its recompute per batch
    assert not getattr(model, "is_gradient_checkpointing", False)  # switched off again
    assert_scores_equal(report, reference)


def test_checkpointed_hooks_hold_one_layers_activations_at_a_time(tiny_frozen):
    from aletheia_ds.probe.hooks import CheckpointPhase, GradNormHooks

    model, layout, _ = tiny_frozen("qwen2")
    modules = {f"{layer}:{t.key}": m for layer, t, m in layout.iter_modules(model)}
    per_layer = len(layout.layer_targets[0])
    for checkpointing, bound in ((True, per_layer), (False, None)):
        phase = CheckpointPhase()
        hooks = GradNormHooks(modules, phase=phase)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=phase.checkpoint_kwargs())
        model.train()
        batch = random_batches(1, 2, 10, seed=4)[0]
        with hooks.attached(model.get_input_embeddings()):
            model(**batch, use_cache=False).loss.backward()
        if checkpointing:
            model.gradient_checkpointing_disable()
            assert 0 < hooks.max_pending <= bound and not hooks.pending
        else:
            assert hooks.max_pending == 0  # the plain path keeps activations in the hooks' closures
        assert int(hooks.calls.sum()) == len(modules)


@pytest.mark.parametrize("tokens,d_in,d_out", [(5, 64, 64), (300, 8, 6), (17, 40, 3)])
def test_weight_grad_norm_both_routes(tokens, d_in, d_out):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    dy = torch.randn(tokens, d_out, generator=g, dtype=torch.float64)
    expected = (dy.T @ x).pow(2).sum()
    assert torch.allclose(weight_grad_sq_norm(x, dy), expected, rtol=1e-10)


def test_probe_sharded_batches_reduce_to_the_same_scores(tiny_frozen):
    """Two simulated ranks (round-robin shards, padded passes weighted 0) + a sum equal one process."""
    model, layout, batches = tiny_frozen("qwen2", batches=(3, 2, 8), seed=5)
    single = hook_scores(model, layout, batches)
    partial = []

    def collect(tensor):
        partial.append(tensor.clone())
        return tensor

    for rank in range(2):
        run_probe(
            model,
            layout,
            batches,
            lambda b: model(**b, use_cache=False).loss,
            rank=rank,
            world_size=2,
            all_reduce_sum=collect,
        )
    # partial = [rank0 norms, rank0 seconds, rank1 norms, rank1 seconds]
    summed = partial[0] + partial[2]
    sharded = ProbeReport.from_sq_norms(
        {(layer, t.key): float(v) for (layer, t, _), v in zip(layout.iter_modules(model), summed[:-1])},
        batches=3,
        num_layers=layout.num_layers,
        model="",
        tokens=int(summed[-1]),
        seconds=0.0,
    )
    assert sharded.tokens == single.tokens
    for a, b in zip(sharded.layers, single.layers):
        assert a.score == pytest.approx(b.score, rel=1e-9)
