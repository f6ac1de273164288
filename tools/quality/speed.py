"""Speed of the same plan shapes at scale: each study plan moved by relative depth onto a large shape, timed.

Transfer is plan.transfer_plan: target layer j of L_t takes the modules and ranks of study layer
floor(j * L / L_t), so the fraction of layers below the cut, the gaps and the ranks are the study plan's.
A shape is timed at one or two
depths of its widths (`qwen2-72b:12+20`); with two, each plan's step time is projected linearly in the
layer count to the shape's full depth (the per-layer cost is what depth changes), as docs/SCALE.md did.
Timing is aletheia_ds.speed.time_plan (attach, frozen prefix, AdamW steps) on random weights, one GPU.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from aletheia_ds.arch import describe
from aletheia_ds.io import write_json_atomic
from aletheia_ds.plan import Plan, transfer_plan
from aletheia_ds.probe.report import LayerScore, ProbeReport
from aletheia_ds.speed import random_batch, time_plan
from tools.quality.settings import Settings


def shape_table() -> dict[str, dict]:
    from tools._common import SHAPES  # the one shape table of the benchmarks

    return SHAPES


def uniform_report(layout) -> ProbeReport:
    """A report with the target's layout and equal scores: what plan.transfer_plan needs of the target."""
    kinds = layout.to_json()["module_kinds"]
    return ProbeReport(
        model="transfer target",
        num_layers=layout.num_layers,
        tokens=0,
        seconds=0.0,
        batches=1,
        layers=[LayerScore(i, 1.0, {k: 1.0 for k in kinds}) for i in range(layout.num_layers)],
        layout=layout.to_json(),
    )


def project(measured: dict[int, float], full_layers: int) -> float:
    """Step time at `full_layers` from the timed depths: linear in the layer count (one depth: scaled by it)."""
    depths = sorted(measured)
    if len(depths) == 1:
        return measured[depths[0]] * full_layers / depths[0]
    (l0, t0), (l1, t1) = (depths[0], measured[depths[0]]), (depths[-1], measured[depths[-1]])
    return t0 + (t1 - t0) * (full_layers - l0) / (l1 - l0)


def plan_from_summary(summary: dict, num_layers: int, kinds: dict[str, str]) -> Plan:
    """The plan a run recorded (arms.plan_summary: layer, module key, rank per adapter) as a Plan with the module
    kinds `kinds` gives its keys, which is all plan.transfer_plan reads (alpha does not change a step's time)."""
    from aletheia_ds.plan import PlannedModule

    modules = [PlannedModule(layer, key, key, kinds[key], r, float(r)) for layer, key, r in summary["modules"]]
    return Plan(
        rule=summary["rule"],
        num_layers=num_layers,
        layers_path="layers",
        layers=sorted({m.layer for m in modules}),
        modules=modules,
        score_captured=summary.get("score_captured", math.nan),
    )


def study_plans(s: Settings, key: str) -> dict[str, dict]:
    """base/arm -> the plan summary of the arm's chosen run on the first seed (random: that seed's draw; pilot: the
    cut its pilot chose, its uniform share is added later) and the base's depth. Read from the run records alone,
    so the stage also runs on a cache restored from the published results (--stage restore)."""
    from tools.quality.arms import read_records
    from tools.quality.report import chosen_runs
    from tools.quality.run import bases_table

    records = read_records(Path(s.cache), key)
    first = s.seed_list()[0]
    plans = {}
    for base, shape in bases_table(s).items():
        for arm, by_seed in chosen_runs(records, base, s).items():
            run = by_seed.get(first)
            if run is None:
                continue
            summary = run.get("pilot_plan", run["plan"])  # the pilot's run records the cut plan it switched to
            plans[f"{base}/{arm}"] = {"summary": summary, "num_layers": shape["layers"]}
    return plans


def shape_result(measured: dict[str, dict[int, float]], full: int, depths: list[int]) -> dict:
    """base/arm -> step seconds per timed depth, projected to the full depth and divided by the base's uniform."""
    arms = {}
    for label, by_depth in measured.items():
        uniform = project(measured[f"{label.split('/')[0]}/uniform"], full)
        step = project(by_depth, full)
        arms[label] = {"measured_s": by_depth, "projected_s": step, "ratio_to_uniform": step / uniform}
    return {"full_layers": full, "depths": depths, "arms": arms}


LOG_LINE = re.compile(r"^\s*(?P<shape>\S+) x (?P<depth>\d+) layers: (?P<label>\S+)\s+(?P<ms>[\d.]+) ms/step$")


def speed_from_logs(paths: list[str], device: str) -> dict:
    """The stage's result rebuilt from the lines it logged (`<shape> x <depth> layers: <base/arm> <ms> ms/step`), for
    a GPU machine whose cache was gone before the JSON was copied off it; the log keeps 0.1 ms."""
    measured: dict[str, dict[str, dict[int, float]]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if found := LOG_LINE.match(line):
                by_label = measured.setdefault(found["shape"], {})
                by_label.setdefault(found["label"], {})[int(found["depth"])] = float(found["ms"]) / 1000
    if not measured:
        raise SystemExit(f"speed: no timing lines in {paths}")
    table = shape_table()
    result = {"device": device, "shapes": {}, "rebuilt_from_logs": [Path(p).name for p in paths]}
    for name, by_label in measured.items():
        depths = sorted({d for by_depth in by_label.values() for d in by_depth})
        result["shapes"][name] = shape_result(by_label, table[name]["num_hidden_layers"], depths)
    return result


def stage_speed(s: Settings, key: str, log) -> dict:
    from tools._common import model_config, random_model

    if s.speed_from_logs:
        result = speed_from_logs(s.names("speed_from_logs"), s.speed_device)
        write_json_atomic(Path(s.cache) / f"speed-{key}.json", result)
        log(f"speed: {', '.join(result['shapes'])} from {s.speed_from_logs}")
        return result

    device = torch.device("cuda" if torch.cuda.is_available() and s.device != "cpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plans = study_plans(s, key)
    if not plans:
        raise SystemExit("speed: no plans in --cache; run --stage arms first")
    table = shape_table()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "shapes": {}}
    for spec in s.names("speed_shapes"):
        name, _, depths = spec.partition(":")
        full = table[name]["num_hidden_layers"]
        depths = [int(d) for d in depths.split("+")] if depths else [full]
        measured: dict[str, dict[int, float]] = {}
        for depth in depths:
            model = random_model(model_config(name, depth), dtype=dtype, device=device)
            layout = describe(model)
            batch = random_batch(s.speed_batch, s.speed_seq_len, table[name]["vocab_size"])
            seen: dict[tuple, float] = {}
            target = uniform_report(layout)
            kinds = layout.to_json()["module_kinds"]
            for label, study in plans.items():
                plan = transfer_plan(plan_from_summary(study["summary"], study["num_layers"], kinds), target)
                signature = tuple((m.layer, m.key, m.r) for m in plan.modules)
                if signature not in seen:  # e.g. uniform is the same plan for both bases
                    seen[signature] = time_plan(model, layout, plan, batch, steps=s.speed_steps, warmup=2).median_s
                measured.setdefault(label, {})[depth] = seen[signature]
                log(f"  {name} x {depth} layers: {label:20s} {1000 * seen[signature]:8.1f} ms/step")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["shapes"][name] = shape_result(measured, full, depths)
    write_json_atomic(Path(s.cache) / f"speed-{key}.json", result)
    return result


def pilot_ratio(after_cut_ratio: float, pilot_fraction: float) -> float:
    """The pilot's whole-run step-time ratio: uniform for its first share, the cut plan after (1/(p + (1-p)/S))."""
    return pilot_fraction + (1.0 - pilot_fraction) * after_cut_ratio if math.isfinite(after_cut_ratio) else math.nan


def meta_layout(shape: str | dict):
    """The layout (module shapes, layer parameters, widths) of a shape (a name of tools/_common.SHAPES, or its
    dict), from a weightless meta model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tools._common import model_config

    if isinstance(shape, str):
        config = model_config(shape)
    else:
        spec = dict(shape)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe(model)


def production_cost(
    report: ProbeReport, shape: str, checkpointing: bool = True, batch_size: int = 8, seq_len: int = 1024
):
    """The study base's cost model with the proportions of production: CostModel.analytic of `shape` (e.g. the
    80-layer Qwen2-72B, gradient checkpointing, 8 x 1024 tokens) rescaled to the base's depth and adapter widths,
    so that a plan cutting the same share of layers with the same ranks costs the base the same share of uniform
    r16's step time as at production scale. The rules then place the cut where the production job would."""
    from aletheia_ds.cost import UNIFORM_RANK, CostModel

    big_layout = meta_layout(shape)
    big_report = uniform_report(big_layout)
    big_report.batch_size, big_report.seq_len = batch_size, seq_len
    big = CostModel.analytic(big_report, checkpointing=checkpointing)
    shapes = report.layout["module_shapes"]
    if len(shapes) != len(big.module_shapes):
        raise ValueError(
            f"production cost: the base has {len(shapes)} target modules per layer, {shape} {len(big.module_shapes)}"
        )
    layers, big_layers = report.num_layers, big.num_layers
    width = sum(UNIFORM_RANK * (i + o) for i, o in shapes.values())
    big_width = sum(UNIFORM_RANK * (i + o) for i, o in big.module_shapes.values())
    scale = big_layers / layers
    return CostModel(
        base_s=big.base_s,
        depth_s=big.depth_s * scale,
        adapter_fixed_s=big.adapter_fixed_s * scale,
        adapter_width_s=big.adapter_width_s * scale * big_width / width,
        layer_weights=[1.0] * layers,
        module_shapes={k: list(v) for k, v in shapes.items()},
        checkpointing=checkpointing,
        tokens_per_step=big.tokens_per_step,
        source=f"analytic {shape} proportions, rescaled to {layers} layers",
    )
