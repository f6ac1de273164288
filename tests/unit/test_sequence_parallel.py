"""What sequence parallelism cannot run is refused in one line naming the knob, before anything is attached; and
the slice decomposition of the probe's norm: <G_r, G> summed over token slices is ||G||^2 (two simulated ranks)."""

import pytest
import torch

from aletheia_ds.config import ConfigError, load_config
from aletheia_ds.probe.hooks import weight_grad_inner_over_slices, weight_grad_sq_norm
from aletheia_ds.sequence_parallel import TokenSlices, check_sequence_parallel


def _check(tiny_frozen, *overrides, world=2, family="llama", attn="sdpa", **model_overrides):
    tiny = tiny_frozen(family, **model_overrides)
    tiny.model.config._attn_implementation = attn
    cfg = load_config(["train.sequence_parallel_size=2", "probe.batch_size=4", "train.micro_batch_size=4", *overrides])
    check_sequence_parallel(cfg, world, tiny.layout, tiny.model.config)


def test_supported_combination_passes(tiny_frozen):
    _check(tiny_frozen)
    _check(tiny_frozen, "train.gradient_checkpointing=true", "train.tiled_mlp=true", "train.frozen_prefix=true")


@pytest.mark.parametrize(
    "overrides, kwargs, knob",
    [
        ([], dict(world=3), "train.sequence_parallel_size=2 must divide the number of ranks (3)"),
        ([], dict(attn="eager"), "model.attn_implementation: eager"),
        ([], dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=30), "must divide the 3 attention heads"),
        (["probe.batch_size=2"], {}, "probe.batch_size=2 must equal train.micro_batch_size=4"),
        (["data.packing=true"], {}, "data.packing: under sequence parallelism only flash attention"),
        (["train.prefix_cache=true"], {}, "train.prefix_cache: not supported under sequence parallelism"),
        (["train.compile=true"], {}, "train.compile: not supported under sequence parallelism"),
        ([], dict(family="mixtral"), "not supported for MoE models"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(tiny_frozen, overrides, kwargs, knob):
    with pytest.raises(ConfigError) as err:
        _check(tiny_frozen, *overrides, **kwargs)
    assert knob in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tokens, d_in, d_out", [(3, 16, 24), (40, 8, 6)])  # the Gram route, the product route
def test_slice_inner_products_add_up_to_the_whole_norm(tokens, d_in, d_out):
    torch.manual_seed(0)
    x, g = torch.randn(2 * tokens, d_in, dtype=torch.float64), torch.randn(2 * tokens, d_out, dtype=torch.float64)
    parts = [(x[:tokens], g[:tokens]), (x[tokens:], g[tokens:])]

    def slices(rank: int) -> TokenSlices:
        # a group of two ranks simulated in one process: rank `rank` sees the other's slice through the collectives
        mine, theirs = parts[rank], parts[1 - rank]

        def gather(t):
            other = theirs[0] if t is mine[0] else theirs[1]
            return torch.cat([t, other] if rank == 0 else [other, t])

        def total(block):  # d_out fits in one product block here: the other rank's block is its whole product
            return block + theirs[1].T @ theirs[0]

        return TokenSlices(size=2, gather=gather, sum=total)

    got = sum(float(weight_grad_inner_over_slices(xs, gs, slices(r))) for r, (xs, gs) in enumerate(parts))
    assert got == pytest.approx(float(weight_grad_sq_norm(x, g)), rel=1e-10)


def test_tiled_mlp_gives_the_plain_loss_and_lora_gradients(tiny_frozen):
    """train.tiled_mlp on one process: DeepSpeed's TiledMLP over 3 slices (hidden 8 < 20 tokens) against the plain
    MLP of the same adapted model, frozen prefix on."""
    from helpers.reports import fake_report

    from aletheia_ds.config import PlanSection
    from aletheia_ds.execution import ExecutionOptions, prepared
    from aletheia_ds.plan import make_plan
    from aletheia_ds.sequence_parallel import tile_mlps

    tiny = tiny_frozen("llama", batches=(1, 2, 20), hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    plan = make_plan(fake_report(tiny.layout, [0.1, 0.2, 5.0, 4.0]), PlanSection(top_pct=50, attention_r=2, mlp_r=4))
    batch = tiny.batches[0]
    results = []
    for tiled in (False, True):
        with prepared(tiny.model, plan, tiny.layout, ExecutionOptions()) as run:
            torch.manual_seed(0)
            for p in run.peft_model.parameters():
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.1)  # LoRA B starts at zero: give every adapter a gradient path
            if tiled:
                assert tile_mlps(run.peft_model, tiny.layout) == 4
            loss = run.peft_model(**batch, use_cache=False).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in run.peft_model.named_parameters() if p.requires_grad}
            results.append((float(loss.detach()), grads))
            if tiled:
                for layer in run.base.model.layers:
                    layer.mlp.__dict__.pop("forward")  # the tiled forward patch, before the adapters come off
    (plain_loss, plain), (tiled_loss, tiled_grads) = results
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == tiled_grads.keys() and any("mlp" in n for n in plain)
    for name, grad in plain.items():
        assert torch.allclose(tiled_grads[name], grad, rtol=1e-5, atol=1e-7), name
