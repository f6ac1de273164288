"""Plan -> peft.LoraConfig; attach; verify that exactly the planned modules got adapters of the planned rank.

PEFT matches `target_modules` by name suffix, `layers_to_transform` by a regex on the layer index, and
silently ignores `rank_pattern` keys that match nothing. The fields below use layer-relative paths
("self_attn.q_proj", never a bare "gate_proj" that would also hit "shared_expert.gate_proj") and an
explicit `layers_pattern`; `verify_adapters` then checks the result module by module, by name built
from the model's own layout, so a silent mismatch becomes an error.

Expert adapters (transformers' fused banks): PEFT's `target_parameters` puts one LoRA on a whole 3-D bank
(E, out, in), its factors holding one rank-r block per expert: lora_A (E*r, in) viewed (E, r, in),
lora_B (out, r*E) viewed (out, r, E). Only the planned experts keep their blocks; every other expert's
A and B blocks are set to exactly zero at attach. With both factors zero, that expert's delta B_e A_e and
both its gradients (B_e^T g x^T and g (A_e x)^T) are exactly zero, so AdamW, weight decay and clipping
leave them at zero for the whole run: the trained and saved adapter is plain PEFT (it loads with
PeftModel.from_pretrained) and carries non-zero weights for the planned experts only, which
`expert_deltas` reads back. megablocks banks are not 3-D parameters; they get this package's own
per-expert LoRA (aletheia_ds/adapters/experts.py).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import torch
import torch.nn as nn

from ..config import ConfigError, LoraSection
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
    targets = {f"{plan.layers_path}.{m.layer}.{m.path}.weight": (m.r, m.alpha) for m in by_parameter(plan)}
    for layer, experts in plan.experts_by_layer().items():
        block = plan.moe[layer]
        if block.style != "hf":
            continue  # megablocks banks: aletheia_ds/adapters/experts.py
        for bank in block.banks:
            targets[f"{plan.layers_path}.{layer}.{bank.path}"] = (experts[0].r, experts[0].alpha)
    for m in plan.routers:
        targets[f"{plan.layers_path}.{m.layer}.{m.path}"] = (m.r, m.alpha)
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
        name = f"{plan.layers_path}.{m.layer}.{m.path}"
        if len(by_path_r[m.path]) > 1 and m.r != r:
            rank_pattern[re.escape(name)] = m.r
        if len(by_path_alpha[m.path]) > 1 and m.alpha != alpha:
            alpha_pattern[re.escape(name)] = m.alpha
    rank_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_r.items() if len(v) == 1}, r))
    alpha_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_alpha.items() if len(v) == 1}, alpha))
    planned = {(m.layer, m.path) for m in modules}
    exclude = sorted(f"{plan.layers_path}.{layer}.{path}" for layer in plan.layers for path in paths
                     if (layer, path) not in planned)
    # parameters by full name: PEFT matches target_parameters and the patterns on it
    for name, (pr, pa) in parameters.items():
        if pr != r:
            rank_pattern[re.escape(name)] = pr
        if pa != alpha:
            alpha_pattern[re.escape(name)] = pa
    fields = {"r": int(r), "lora_alpha": float(alpha), "target_modules": paths,
              "layers_to_transform": plan.layers if paths else None,
              "layers_pattern": plan.layers_path.rsplit(".", 1)[-1] if paths else None, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern, "exclude_modules": exclude or None}
    if parameters:
        fields["target_parameters"] = sorted(parameters)
    return fields


def build_lora_config(plan: Plan, section: LoraSection | None = None):
    from peft import LoraConfig

    section = section or LoraSection()
    fields = lora_config_fields(plan)
    if fields.get("target_parameters") and section.dropout:
        raise ConfigError(f"lora.dropout={section.dropout}: expert and router adapters (PEFT target_parameters) "
                          "cannot apply dropout; set lora.dropout=0")
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=section.dropout, bias="none", **fields)


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """One clear line when the plan names an expert, bank or MoE layer this model does not have."""
    from ..arch import find_moe_block, get_submodule

    if not plan.moe:
        return
    try:
        layers = get_submodule(model, plan.layers_path)
    except AttributeError:
        raise ConfigError(f"plan: the model has no {plan.layers_path!r}") from None
    for layer, block in sorted(plan.moe.items()):
        found = find_moe_block(layers[layer]) if layer < len(layers) else None
        if found is None:
            raise ConfigError(f"plan: layer {layer} of the model is not a MoE layer, but the plan puts experts or a "
                              "router there; re-plan from this model's probe")
        planned = [e.expert for e in plan.experts if e.layer == layer]
        if planned and max(planned) >= found.num_experts:
            raise ConfigError(f"plan: expert {max(planned)} of layer {layer} does not exist (the model's layer {layer} "
                              f"has {found.num_experts} experts: 0..{found.num_experts - 1})")
        if {b.path for b in block.banks} != {b.path for b in found.banks} or block.style != found.style:
            raise ConfigError(f"plan: layer {layer}'s expert banks {[b.path for b in block.banks]} differ from the "
                              f"model's {[b.path for b in found.banks]}; re-plan from this model's probe")


def attach(model: nn.Module, plan: Plan, section: LoraSection | None = None):
    """Wrap `model` with the plan's adapters (same initial weights on every rank) and verify them."""
    from peft import get_peft_model

    section = section or LoraSection()
    check_plan_fits(model, plan)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        # every rank must create identical adapter weights: ZeRO-3 partitions each rank's own copy
        torch.manual_seed(section.init_seed)
        with warnings.catch_warnings():
            # PEFT checks rank/alpha patterns against module names only, so keys naming wrapped parameters look
            # unmatched to it; verify_adapters below checks every rank that was actually applied
            warnings.filterwarnings("ignore", message=".*pattern keys did not match any targeted module.*")
            peft_model = get_peft_model(model, build_lora_config(plan, section))
        keep_planned_experts_only(peft_model, plan)
        if any(block.style == "megablocks" for block in plan.moe.values()):
            from .experts import attach_expert_lora

            attach_expert_lora(peft_model, plan)
    verify_adapters(peft_model, plan)
    return peft_model


def _param_wrappers(peft_model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """{full parameter name without the PEFT prefix: its PEFT ParamWrapper} (nested wrappers unwrapped)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "parameter_name") and adapter in module.r:
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            found[f"{owner}.{module.parameter_name}"] = module
    return found


def _expert_factors(wrapper: nn.Module, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert views of a bank's LoRA factors: A (E, r, in), B (out, r, E) -- PEFT's own layout."""
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    return a.view(wrapper.num_experts, -1, a.shape[-1]), b.view(b.shape[0], -1, wrapper.num_experts)


@torch.no_grad()
def keep_planned_experts_only(peft_model: nn.Module, plan: Plan, adapter: str = "default") -> None:
    """Zero every unplanned expert's A and B blocks in each fused bank (the module docstring says why that
    holds them at zero through training)."""
    wrappers = _param_wrappers(peft_model, adapter)
    for layer, experts in plan.experts_by_layer().items():
        block = plan.moe[layer]
        if block.style != "hf":
            continue
        unplanned = sorted(set(range(block.num_experts)) - {e.expert for e in experts})
        for bank in block.banks:
            a, b = _expert_factors(wrappers[f"{plan.layers_path}.{layer}.{bank.path}"], adapter)
            a[unplanned] = 0.0
            b[:, :, unplanned] = 0.0


@torch.no_grad()
def expert_deltas(peft_model: nn.Module, adapter: str = "default") -> dict[str, list[float]]:
    """{bank parameter name: [||delta_e||_F for each expert e]} of every fused-bank adapter, delta_e = s B_e A_e.

    Read from a trained model or one reloaded with PeftModel.from_pretrained: the experts with a non-zero
    delta are the ones the adapter changes.
    """
    norms = {}
    for name, wrapper in _param_wrappers(peft_model, adapter).items():
        if getattr(wrapper, "num_experts", 1) <= 1:
            continue
        a, b = _expert_factors(wrapper, adapter)
        scaling = wrapper.scaling[adapter]
        norms[name] = [float((b[:, :, e].double() @ a[e].double()).norm() * scaling) for e in range(a.shape[0])]
    norms.update(_megablocks_deltas(peft_model))
    return norms


def _megablocks_deltas(peft_model: nn.Module) -> dict[str, list[float]]:
    from .experts import expert_lora_deltas

    return expert_lora_deltas(peft_model)


def adapter_modules(peft_model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """{module name without the PEFT prefix: (rank, alpha)} for every LoRA layer in the model.

    A wrapped parameter (fused expert bank, router weight) is named by its parameter: "...mlp.experts.down_proj".
    """
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            short = name.removeprefix("base_model.model.")
            if hasattr(module, "parameter_name"):
                short = f"{short.replace('.base_layer', '')}.{module.parameter_name}"
            r = module.r[adapter]
            found[short] = (r, module.lora_alpha[adapter])
    return found


def verify_adapters(peft_model: nn.Module, plan: Plan, adapter: str = "default") -> None:
    """Exactly the planned (layer, module) pairs carry adapters of the planned rank and alpha; nothing else trains."""
    param_keys = {(m.layer, m.key) for m in by_parameter(plan)}
    expected = {f"{plan.layers_path}.{m.layer}.{m.path}": (m.r, m.alpha) for m in plan.modules
                if (m.layer, m.key) not in param_keys}
    expected.update(parameter_ranks(plan))
    found = adapter_modules(peft_model, adapter)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{name} r={found[name][0]} alpha={found[name][1]} (planned r={r} alpha={a})"
                   for name, (r, a) in expected.items() if name in found and
                   (found[name][0] != r or abs(found[name][1] - a) > 1e-9))
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n)
    problems = _expert_problems(peft_model, plan, adapter)
    if missing:
        problems.append(f"{len(missing)} planned modules got no adapter (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unplanned modules got an adapter (first: {extra[0]})")
    if wrong:
        problems.append(f"{len(wrong)} adapters have the wrong rank (first: {wrong[0]})")
    if trainable:
        problems.append(f"non-LoRA parameters are trainable (first: {trainable[0]})")
    if problems:
        raise ConfigError("plan/model mismatch after attaching LoRA: " + "; ".join(problems))


@torch.no_grad()
def _expert_problems(peft_model: nn.Module, plan: Plan, adapter: str) -> list[str]:
    """Each fused bank's adapter is non-zero exactly on the planned experts' A blocks, zero elsewhere."""
    problems = []
    wrappers = _param_wrappers(peft_model, adapter)
    for layer, experts in plan.experts_by_layer().items():
        block = plan.moe[layer]
        if block.style != "hf":
            continue
        planned = {e.expert for e in experts}
        for bank in block.banks:
            name = f"{plan.layers_path}.{layer}.{bank.path}"
            if name not in wrappers:
                continue  # reported as a missing adapter
            wrapper = wrappers[name]
            if wrapper.num_experts != block.num_experts:
                problems.append(f"{name} adapts {wrapper.num_experts} experts, the plan expects {block.num_experts}")
                continue
            a, b = _expert_factors(wrapper, adapter)
            live = {e for e in range(block.num_experts) if a[e].abs().sum() > 0 or b[:, :, e].abs().sum() > 0}
            if live != planned:
                problems.append(f"{name} has adapters on experts {sorted(live)}, the plan on {sorted(planned)}")
    from .experts import expert_lora_problems

    return problems + expert_lora_problems(peft_model, plan)
