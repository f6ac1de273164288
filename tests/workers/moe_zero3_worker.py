"""PYTHONPATH=.:tests DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_addr 127.0.0.1 \
    tests/workers/moe_zero3_worker.py \
    --models DIR --out DIR

One ZeRO-3 job per rank for tests/distributed/test_moe_distributed.py:
  1. for every model directory under --models/probe/<family>: build it under zero.Init, probe it (with the
     probe's activation checkpointing) on random batches dealt round-robin across ranks, check that no
     weight stays gathered afterwards, write <out>/probe_<family>.json (rank 0)
  2. --models/split: a model whose routers send low token ids to experts {0, 1} and high ids to {2, 3};
     rank 0 probes and trains on low ids only, rank 1 on high ids only, so the ranks' tokens reach
     disjoint experts. Probe, plan (rank 0, broadcast), expert-level LoRA, a few ZeRO-3 steps, export
     the adapter and the logits of a fixed batch.
  3. the routed expert forward against PEFT's bank-delta forward: the same split model and batches, a plan of the
     upper half of the layers (a frozen prefix below the cut), trained a few steps once with each
     (`lora.expert_forward`), losses and exported adapters written to <out>/routed_vs_peft/<forward>
  4. the same routing-split model with transformers-4-style blocks (experts in a ModuleList, only experts
     that receive tokens run): forward passes where each rank's tokens reach only its own experts
--no-leaf skips the z3 leaf-module settings, MoE blocks and PEFT parameter adapters alike (to see what
happens without them); --only-list runs step 4 alone.
"""

import argparse
import time
from pathlib import Path

import torch
from helpers.families import ListExpertsMoe, random_batches, token_batches, with_list_experts

from aletheia_ds.adapters.attach import attach
from aletheia_ds.adapters.export import export_adapter
from aletheia_ds.adapters.peft_config import plan_json
from aletheia_ds.adapters.routed import routed_expert_modules
from aletheia_ds.arch import describe
from aletheia_ds.config import load_config
from aletheia_ds.dist import DistContext, distributed, gathered_parameters, print0
from aletheia_ds.execution import ExecutionOptions, PreparedModel
from aletheia_ds.io import save_safetensors_atomic, write_json_atomic
from aletheia_ds.model import load_model
from aletheia_ds.plan import make_plan
from aletheia_ds.probe.run import run_probe
from aletheia_ds.train import param_groups

ROOT = Path(__file__).resolve().parents[2]

# the data both sides use (the test builds the same batches for its single-process reference)
PROBE_BATCHES = dict(count=4, batch_size=2, seq_len=12, seed=11)
SPLIT_LOW, SPLIT_HIGH = (3, 50), (50, 96)
TRAIN_STEPS = 4


def split_probe_batches() -> list[dict]:
    """Interleaved so that round-robin dealing gives rank 0 the low-id and rank 1 the high-id batches."""
    low = token_batches(2, 2, 12, *SPLIT_LOW, seed=21)
    high = token_batches(2, 2, 12, *SPLIT_HIGH, seed=22)
    return [low[0], high[0], low[1], high[1]]


def split_train_batches(rank: int) -> list[dict]:
    span, seed = (SPLIT_LOW, 31) if rank == 0 else (SPLIT_HIGH, 32)
    return token_batches(TRAIN_STEPS, 2, 12, *span, seed=seed)


def logits_batch() -> dict:
    return random_batches(1, 2, 12, seed=41)[0]


def build(ctx: DistContext, cfg, path: Path, leaf: bool):
    section = cfg.model.model_copy(update={"path": str(path)})
    model = load_model(section, torch.float32, ctx.device, ctx.model_init, zero3=ctx.zero3)
    layout = describe(model)
    if leaf:
        ctx.set_z3_leaf_modules(model, layout.moe_block_classes(model))
    return model, layout


def probe(ctx: DistContext, model, layout, batches):
    """The probe with its own activation checkpointing: afterwards no weight may stay gathered."""
    with ctx.probe_session(model) as forward:
        report = run_probe(
            model,
            layout,
            batches,
            forward,
            rank=ctx.rank,
            world_size=ctx.world_size,
            all_reduce_sum=ctx.all_reduce_sum,
            checkpointing=True,
        )
    left = gathered_parameters(model)
    assert not left, f"rank {ctx.rank}: {len(left)} parameters still gathered after the probe: {left[:5]}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-leaf", action="store_true")
    parser.add_argument("--only-list", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    models, out = Path(args.models), Path(args.out)
    cfg = load_config(
        [
            f"model.path={models / 'split'}",
            "model.dtype=float32",
            "train.micro_batch_size=2",
            "train.lr=0.02",
            f"deepspeed.config={ROOT / 'ds_configs/zero3.json'}",
            "plan.top_pct=50",
            "plan.expert_rule=top_k",
            "plan.expert_top_k=3",
            "plan.attention_r=4",
            "plan.mlp_r=4",
            "plan.expert_r=4",
            # every parameter partitioned: the default threshold would keep tiny weights whole on
            # every rank, and nothing here would depend on ZeRO-3 fetching them
            "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
        ]
    )
    leaf = not args.no_leaf
    started = time.perf_counter()
    with distributed(cfg) as ctx:
        if not leaf:
            ctx._param_adapters_as_leaves = lambda model: None
        if not args.only_list:
            report = probe_and_train(ctx, cfg, models, out, leaf, started)
            routed_vs_peft(ctx, cfg, models, out / "routed_vs_peft", report, started)
        list_experts_forward(ctx, cfg, models, leaf)
        ctx.barrier()
        print0(f"done at {time.perf_counter() - started:.1f} s")


def list_experts_forward(ctx: DistContext, cfg, models: Path, leaf: bool) -> None:
    section = cfg.model.model_copy(update={"path": str(models / "split")})
    model = with_list_experts(load_model(section, torch.float32, ctx.device, ctx.model_init, zero3=ctx.zero3))
    if leaf:
        ctx.set_z3_leaf_modules(model, [ListExpertsMoe])
    routed = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out: routed.append(out[2]))
    with ctx.probe_session(model) as forward, torch.no_grad():
        for batch in split_train_batches(ctx.rank)[:2]:
            forward(batch)
    experts = sorted(set(torch.cat([r.flatten() for r in routed]).tolist()))
    print(f"rank {ctx.rank} list-experts forward done; experts run: {experts}", flush=True)


def probe_and_train(ctx: DistContext, cfg, models: Path, out: Path, leaf: bool, started: float) -> None:
    for family_dir in sorted((models / "probe").iterdir()):
        model, layout = build(ctx, cfg, family_dir, leaf)
        report = probe(ctx, model, layout, random_batches(**PROBE_BATCHES))
        if ctx.is_main:
            write_json_atomic(out / f"probe_{family_dir.name}.json", report.to_json())
        print0(f"probed {family_dir.name} at {time.perf_counter() - started:.1f} s")
        del model

    model, layout = build(ctx, cfg, models / "split", leaf)
    report = probe(ctx, model, layout, split_probe_batches())
    plan = ctx.broadcast_object(make_plan(report, cfg.plan) if ctx.is_main else None)
    model = attach(model, plan, cfg.lora)
    engine, _, _ = ctx.initialize(
        model, param_groups(model, 0.0), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), cfg.train.lr
    )
    engine.train()
    losses = []
    for batch in split_train_batches(ctx.rank):
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    print(f"rank {ctx.rank} losses {losses} at {time.perf_counter() - started:.1f} s", flush=True)
    export_adapter(ctx, model, out / "adapter")
    engine.eval()
    with torch.no_grad():
        batch = logits_batch()
        logits = engine(**batch, use_cache=False).logits
    if ctx.is_main:
        write_json_atomic(out / "probe_split.json", report.to_json())
        write_json_atomic(out / "plan.json", plan_json(plan))
        save_safetensors_atomic(out / "logits.safetensors", {"logits": logits.float(), **batch})
    engine.destroy()
    return report


def routed_vs_peft(ctx: DistContext, cfg, models: Path, out: Path, report, started: float) -> None:
    """Step 3 of the module docstring: each expert forward trains from the same start on the same batches."""
    plan = make_plan(report, cfg.plan.model_copy(update={"rule": "upper"}))
    assert plan.lowest_adapted_layer > 0 and plan.experts, plan.layers
    for forward in ("routed", "peft"):
        model, layout = build(ctx, cfg, models / "split", leaf=True)
        options = ExecutionOptions(lora=cfg.lora.model_copy(update={"expert_forward": forward}), frozen_prefix=True)
        prepared = PreparedModel.apply(model, plan, layout, options)
        assert prepared.frozen_prefix is not None
        engine, _, _ = ctx.initialize(
            prepared.peft_model,
            param_groups(prepared.peft_model, 0.0),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
            cfg.train.lr,
        )
        engine.train()
        losses = []
        for batch in split_train_batches(ctx.rank):
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        export_adapter(ctx, prepared.peft_model, out / forward)
        if ctx.is_main:
            routed = routed_expert_modules(prepared.peft_model)
            write_json_atomic(
                out / forward / "run.json", {"rank0_losses": losses, "plan_layers": plan.layers, "routed": routed}
            )
        print(f"rank {ctx.rank} {forward} expert forward losses {losses} at {time.perf_counter() - started:.1f} s")
        engine.destroy()
        del model, prepared, engine


if __name__ == "__main__":
    main()
