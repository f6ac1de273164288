"""Timed LoRA steps on one device: the harness behind `aletheia-ds bench` (cost calibration) and
tools/bench_speed.py. No DeepSpeed: one process, the model on one device, adapters attached and removed
in place (PEFT unload) so many configurations share one loaded base model.

"standard" path = what HF Trainer / LLaMA-Factory do: with gradient checkpointing they call
`enable_input_require_grads`, so backward runs through every layer. "frozen prefix" = this project's path.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .arch import Layout
from .config import LoraSection
from .cost import AdapterShape, CostModel, measurement_plans
from .execution import ExecutionOptions, prepared
from .plan import Plan, PlannedModule


def plan_from_adapters(layout: Layout, adapters: Sequence[tuple[int, str, int]], rule: str = "custom") -> Plan:
    """A Plan from explicit (layer, module key, rank) triples, alpha = 2r."""
    kinds, paths = layout.kinds(), layout.paths()
    modules = [PlannedModule(layer, key, paths[key], kinds[key], r, 2.0 * r) for layer, key, r in adapters]
    return Plan(
        rule=rule,
        num_layers=layout.num_layers,
        layers_path=layout.layers_path,
        layers=sorted({m.layer for m in modules}),
        modules=modules,
        score_captured=float("nan"),
    ).check()


def shapes_to_plan(layout: Layout, adapters: Sequence[AdapterShape], rule: str) -> Plan:
    """Cost-model adapter shapes -> a plan on this layout (each (in, out) shape names one module key)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for key, shape in layout.shapes().items():
        by_shape.setdefault(tuple(shape), []).append(key)
    used: dict[tuple[int, tuple[int, int]], int] = {}
    triples = []
    for layer, r, d_in, d_out in adapters:
        slot = used.get((layer, (d_in, d_out)), 0)
        used[(layer, (d_in, d_out))] = slot + 1
        triples.append((layer, by_shape[(d_in, d_out)][slot], r))
    return plan_from_adapters(layout, triples, rule)


@dataclass
class StepTiming:
    median_s: float
    steps: list[float]
    tokens_per_s: float
    peak_memory_gib: float
    loss: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plan(
    model: nn.Module,
    layout: Layout,
    plan: Plan,
    batch: dict,
    *,
    steps: int = 10,
    warmup: int = 3,
    checkpointing: bool = False,
    frozen_prefix: bool = True,
    adapter_dtype: torch.dtype | None = None,
    compile_layers: bool = False,
    prefix_cache: bool = False,
    lora: LoraSection | None = None,
) -> StepTiming:
    """Attach `plan`, run warm-up + timed optimizer steps on `batch`, detach. Median seconds per step.

    `prefix_cache`: the steady state of later epochs (the batch's prefix output stored once, then replayed).
    """
    device = next(model.parameters()).device
    options = ExecutionOptions(
        lora=lora or LoraSection(),
        adapter_dtype=adapter_dtype,
        checkpointing=checkpointing,
        frozen_prefix=frozen_prefix,
        input_require_grads=checkpointing and not frozen_prefix,
        prefix_cache=prefix_cache,
        compile_layers=compile_layers,
    )
    with prepared(model, plan, layout, options) as execution:
        peft_model, cache = execution.peft_model, execution.prefix_cache
        if cache is not None:
            rows = list(range(batch["input_ids"].shape[0]))
            with torch.no_grad():
                cache.begin(rows, batch["attention_mask"])
                peft_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        peft_model.train()
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = int(batch["attention_mask"].sum())
        times, loss = [], float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            if cache is not None:
                cache.begin(rows, batch["attention_mask"])
            out = peft_model(**batch, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
            loss = float(out.loss.detach())
            del out
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        median = statistics.median(times)
        return StepTiming(median, times, tokens / median, peak, loss)


def calibrate(
    model: nn.Module,
    layout: Layout,
    batch: dict,
    *,
    checkpointing: bool = False,
    steps: int = 5,
    warmup: int = 2,
    adapter_dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> CostModel:
    """Time the configurations of cost.measurement_plans (frozen prefix on) and fit the cost model."""
    measured = []
    configs = measurement_plans(layout.num_layers, layout.shapes())
    # a throw-away run first: clocks, allocator and kernels warm, so the first timed configuration is not slow
    time_plan(
        model,
        layout,
        shapes_to_plan(layout, configs["uniform_r16"], "warm-up"),
        batch,
        steps=1,
        warmup=warmup,
        checkpointing=checkpointing,
        adapter_dtype=adapter_dtype,
    )
    for name, adapters in configs.items():
        plan = shapes_to_plan(layout, adapters, name)
        timing = time_plan(
            model,
            layout,
            plan,
            batch,
            steps=steps,
            warmup=warmup,
            checkpointing=checkpointing,
            adapter_dtype=adapter_dtype,
        )
        log(f"calibrate: {name}: {timing.median_s * 1000:.1f} ms/step")
        measured.append((adapters, timing.median_s))
    mean = sum(layout.layer_params) / len(layout.layer_params)
    return CostModel.fit(
        measured,
        [p / mean for p in layout.layer_params],
        layout.shapes(),
        checkpointing,
        tokens_per_step=int(batch["attention_mask"].sum()),
        source=f"calibrated on {device_name()} ({len(measured)} configurations)",
    )


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def calibrate_cli(args) -> None:
    """`aletheia-ds bench --model DIR --out cost.json`: calibrate on this machine's first device."""
    import contextlib

    from .arch import describe
    from .config import ModelSection
    from .model import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(
        ModelSection(path=args.model, random_init=args.random_init), dtype, device, contextlib.nullcontext
    )
    layout = describe(model)
    batch = random_batch(args.batch_size, args.seq_len, layout.vocab_size)
    cost = calibrate(model, layout, batch, checkpointing=args.checkpointing, steps=args.steps, adapter_dtype=dtype)
    cost.save(args.out)
    print(
        f"wrote {args.out}: base {cost.base_s * 1000:.1f} ms, depth {cost.depth_s * 1000:.2f} ms/layer, "
        f"adapter {cost.adapter_fixed_s * 1000:.3f} ms + {cost.adapter_width_s * 1e9:.3f} ns per r(d_in+d_out); "
        f"fit residuals {[f'{r:+.1%}' for r in cost.fit_residuals]}"
    )
