"""Ulysses sequence parallelism (train.sequence_parallel_size) against the same job without it: 2 CPU ranks over
gloo, ZeRO-3, the same examples in the same order. With sequence parallelism each batch is split over both ranks
(tiled loss over the vocabulary, tiled MLP, frozen prefix below the cut), with and without gradient checkpointing;
without it each rank runs its own batch whole. The reference is the plain job with checkpointing (which recomputes
exactly): probe scores, losses and held-out losses must agree to float32 round-off, and so must the gradient norms
DeepSpeed applies and the trained adapters."""

import json

import pytest
import torch
from helpers.ranks import read_jsonl, run_train, save_tiny_llama, tiny_run_config

pytestmark = pytest.mark.distributed

# float32 sums taken in a different order (slices, tiles, all-to-all): agreement to ~1e-6 relative is round-off
RTOL = 1e-5


def _run(tmp_path, model_dir, sp: int, **train):
    out = tmp_path / f"sp{sp}{'_checkpointed' if train.get('gradient_checkpointing') else ''}"
    config = tiny_run_config(
        model_dir,
        out,
        model={"attn_implementation": "sdpa", "dtype": "float32"},
        probe={"batches": 3, "batch_size": 4, "sketch_dim": 4},
        plan={"rule": "upper", "top_pct": 50, "attention_r": 4, "mlp_r": 8},  # a frozen prefix below layer 2
        train={"max_steps": 3, "sequence_parallel_size": sp, **train},
    )
    run_train(config, tmp_path, nprocs=2, timeout=600)
    return out


def test_sequence_parallel_matches_the_plain_job(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model", layers=4)
    plain = _run(tmp_path, model_dir, 1, gradient_checkpointing=True)
    # checkpointed: each layer's recompute runs inside ZeRO-3's backward, TiledMLP's own recompute inside it
    for checkpointing in (False, True):
        split = _run(tmp_path, model_dir, 2, tiled_mlp=True, gradient_checkpointing=checkpointing)
        _assert_same_job(plain, split)


def _assert_same_job(plain, split):
    from safetensors.torch import load_file

    probes = [json.loads((run / "probe.json").read_text()) for run in (plain, split)]
    for reference, got in zip(*(p["layers"] for p in probes)):
        for kind in ("modules", "signal"):
            for key, value in reference[kind].items():
                assert got[kind][key] == pytest.approx(value, rel=RTOL), (reference["index"], kind, key)
    assert probes[0]["tokens"] == probes[1]["tokens"]

    plans = [json.loads((run / "plan.json").read_text()) for run in (plain, split)]
    assert plans[0]["layers"] == plans[1]["layers"] and min(plans[0]["layers"]) > 0  # a frozen prefix ran

    rows = [[r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (plain, split)]
    assert len(rows[0]) == len(rows[1]) == 3
    for reference, got in zip(*rows):
        assert got["loss"] == pytest.approx(reference["loss"], rel=RTOL)

    evals = [json.loads((run / "eval.json").read_text()) for run in (plain, split)]
    for key in ("eval_loss_before", "eval_loss_after"):
        assert evals[1][key] == pytest.approx(evals[0][key], rel=1e-4)

    # the LoRA gradients DeepSpeed applies (Adam's scale invariance would hide a constant factor in the losses)
    ratios = [got["grad_norm"] / reference["grad_norm"] for reference, got in zip(*rows)]
    adapters = [load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (plain, split)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(r == pytest.approx(1.0, rel=1e-4) for r in ratios), ratios
    for name, weight in adapters[0].items():
        assert torch.allclose(adapters[1][name], weight, rtol=1e-4, atol=1e-6), name
