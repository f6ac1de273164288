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
