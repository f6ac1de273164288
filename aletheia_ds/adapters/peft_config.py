"""Plan -> peft.LoraConfig: the exact PEFT fields that put the planned adapters, and only them, on the model.

PEFT matches `target_modules` by name suffix, `layers_to_transform` by a regex on the layer index, and
silently ignores `rank_pattern` keys that match nothing. The fields below use layer-relative paths
("self_attn.q_proj", never a bare "gate_proj" that would also hit "shared_expert.gate_proj") and an
explicit `layers_pattern`; aletheia_ds/adapters/attach.py then checks the result module by module, so a
silent mismatch becomes an error. Pure: peft is imported only to build the LoraConfig object itself.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..config import ConfigError, LoraSection, rank_scaling_conflict
from ..io import write_json_atomic
from ..plan import Plan, PlannedModule


def _pattern(values: dict[str, float], default: float) -> dict[str, float]:
    return {re.escape(path): value for path, value in sorted(values.items()) if value != default}


def by_parameter(plan: Plan) -> list[PlannedModule]:
    """Planned linears adapted through PEFT `target_parameters` ("<path>.weight") instead of `target_modules`.

    In MoE models, PEFT rewrites `target_modules` entries ending in an expert projection name (`gate_proj`,
    `up_proj`, `down_proj`, `w1`..`w3`, `gate`) into whole-model `target_parameters` (its conversion of
    transformers-4 configs, peft/utils/transformers_weight_conversion.py), which would hit every expert bank
    and drop the dense MLP and shared-expert linears we meant. Naming their weights as parameters keeps the
    plan exact and the saved adapter loadable; the price is PEFT's parameter path (W + BA formed per step).
    """
    if not plan.moe:
        return []
    return [m for m in plan.modules if m.kind != "attention"]


def parameter_ranks(plan: Plan) -> dict[str, tuple[int, float]]:
    """{full parameter name: (r, alpha)} of every parameter PEFT wraps: hf fused banks of planned experts,
    router weights, and (MoE models) MLP linear weights."""
    targets = {plan.module_name(m.layer, f"{m.path}.weight"): (m.r, m.alpha) for m in by_parameter(plan)}
    for _, experts, _, name in plan.expert_banks("hf"):  # megablocks banks: aletheia_ds/adapters/experts.py
        targets[name] = (experts[0].r, experts[0].alpha)
    for m in plan.routers:
        targets[plan.module_name(m.layer, m.path)] = (m.r, m.alpha)
    return targets


def lora_config_fields(plan: Plan) -> dict:
    """The exact LoraConfig fields of a plan (also written into plan.json)."""
    parameters = parameter_ranks(plan)
    param_keys = {(m.layer, m.key) for m in by_parameter(plan)}
    modules = [m for m in plan.modules if (m.layer, m.key) not in param_keys]
    ranked = [(m.r, m.alpha) for m in modules] or list(parameters.values()) or [(8, 16.0)]
    r = Counter(x for x, _ in ranked).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranked).most_common(1)[0][0]
    paths = sorted({m.path for m in modules})
    by_path_r: dict[str, set] = {}
    by_path_alpha: dict[str, set] = {}
    for m in modules:
        by_path_r.setdefault(m.path, set()).add(m.r)
        by_path_alpha.setdefault(m.path, set()).add(m.alpha)
    rank_pattern: dict[str, float] = {}
    alpha_pattern: dict[str, float] = {}
    # one key per module path when its rank is the same in every planned layer, else one per full name
    for m in modules:
        name = plan.module_name(m.layer, m.path)
        if len(by_path_r[m.path]) > 1 and m.r != r:
            rank_pattern[re.escape(name)] = m.r
        if len(by_path_alpha[m.path]) > 1 and m.alpha != alpha:
            alpha_pattern[re.escape(name)] = m.alpha
    rank_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_r.items() if len(v) == 1}, r))
    alpha_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_alpha.items() if len(v) == 1}, alpha))
    planned = {(m.layer, m.path) for m in modules}
    exclude = sorted(
        plan.module_name(layer, path) for layer in plan.layers for path in paths if (layer, path) not in planned
    )
    # parameters by full name: PEFT matches target_parameters and the patterns on it
    for name, (pr, pa) in parameters.items():
        if pr != r:
            rank_pattern[re.escape(name)] = pr
        if pa != alpha:
            alpha_pattern[re.escape(name)] = pa
    fields = {
        "r": int(r),
        "lora_alpha": float(alpha),
        "target_modules": paths,
        "layers_to_transform": plan.layers if paths else None,
        "layers_pattern": plan.layers_path.rsplit(".", 1)[-1] if paths else None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "exclude_modules": exclude or None,
    }
    if parameters:
        fields["target_parameters"] = sorted(parameters)
    return fields


def variant_fields(section: LoraSection) -> dict:
    """The LoraConfig fields of lora.variant / lora.use_rslora / lora.init."""
    return {
        "use_dora": section.variant == "dora",
        "use_rslora": section.use_rslora,
        "init_lora_weights": True if section.init == "default" else section.init,
    }


def check_variant(plan: Plan, section: LoraSection, fields: dict) -> None:
    """One line for each variant this plan's adapters cannot carry (PEFT would fail later or, worse, not at all)."""
    problem = rank_scaling_conflict(plan.rule, plan.settings.get("rank_scaling"), section)
    if problem:
        raise ConfigError(problem)
    changed = [
        knob
        for knob, value, default in (
            ("lora.variant", section.variant, "lora"),
            ("lora.init", section.init, "default"),
            ("lora.use_rslora", section.use_rslora, False),
        )
        if value != default
    ]
    if changed and any(True for _ in plan.expert_banks("megablocks")):
        raise ConfigError(
            f"{changed[0]}: this plan's megablocks expert banks carry this package's own per-expert LoRA (alpha/r, "
            f"B zero at start), which has no such variant; set {changed[0]} back or plan.expert_rule=none"
        )
    special = [k for k in changed if k != "lora.use_rslora" and not (k == "lora.init" and section.init == "gaussian")]
    if special and fields.get("target_parameters"):
        raise ConfigError(
            f"{special[0]}={getattr(section, special[0].split('.')[1])}: PEFT supports it on linear layers only, and "
            "this MoE plan adapts expert banks, routers or MoE-layer MLPs as parameters (target_parameters); "
            f"set {special[0]} back"
        )
    if section.rewrites_base and section.use_rslora and (fields["rank_pattern"] or fields["alpha_pattern"]):
        raise ConfigError(
            f"lora.init={section.init} with lora.use_rslora=true: PEFT cannot convert the trained adapter back to the "
            "original base when ranks differ per module (rank_pattern); set lora.use_rslora=false or give "
            "attention and MLP one rank and alpha"
        )
    if section.init == "orthogonal":
        odd = sorted({m.r for m in plan.modules if m.r % 2})
        if odd:
            raise ConfigError(f"lora.init=orthogonal: needs even ranks, the plan has rank {odd[0]}; use even ranks")


def build_lora_config(plan: Plan, section: LoraSection | None = None):
    from peft import LoraConfig

    section = section or LoraSection()
    fields = lora_config_fields(plan)
    if fields.get("target_parameters") and section.dropout:
        raise ConfigError(
            f"lora.dropout={section.dropout}: expert and router adapters (PEFT target_parameters) "
            "cannot apply dropout; set lora.dropout=0"
        )
    check_variant(plan, section, fields)
    return LoraConfig(
        task_type="CAUSAL_LM", lora_dropout=section.dropout, bias="none", **fields, **variant_fields(section)
    )


def plan_json(plan: Plan) -> dict:
    """plan.json: the plan and the exact LoraConfig fields it attaches with."""
    return {**plan.to_json(), "lora_config": lora_config_fields(plan)}


def save_plan(plan: Plan, path: str | Path) -> None:
    write_json_atomic(path, plan_json(plan))
