"""Attach the planned adapters to a model and verify that exactly the planned modules got them, at the planned rank.

The LoraConfig comes from aletheia_ds/adapters/peft_config.py; `verify_adapters` checks the attached model
module by module, by names built from the plan, so a silent PEFT mismatch becomes an error.

Expert adapters (transformers' fused banks): PEFT's `target_parameters` puts one LoRA on a whole 3-D bank
(E, out, in), its factors holding one rank-r block per expert: lora_A (E*r, in) viewed (E, r, in),
lora_B (out, r*E) viewed (out, r, E). Only the planned experts keep their blocks; every other expert's
A and B blocks are set to exactly zero at attach. With both factors zero, that expert's delta B_e A_e and
both its gradients (B_e^T g x^T and g (A_e x)^T) are exactly zero, so AdamW, weight decay and clipping
leave them at zero for the whole run: the trained and saved adapter is plain PEFT (it loads with
PeftModel.from_pretrained) and carries non-zero weights for the planned experts only, which
`expert_deltas` reads back. Training runs these factors on the routed tokens only (`lora.expert_forward=routed`,
aletheia_ds/adapters/routed.py): the same parameters, without forming W + BA per bank. megablocks banks are not
3-D parameters; they get this package's own per-expert LoRA (aletheia_ds/adapters/experts.py).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ..arch import find_moe_block, get_submodule
from ..config import ConfigError, LoraSection
from ..plan import Plan
from .experts import attach_expert_lora, expert_lora_deltas, expert_lora_problems
from .peft_config import build_lora_config, by_parameter, parameter_ranks
from .routed import route_expert_lora


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """One clear line when the plan names an expert, bank or MoE layer this model does not have."""
    if not plan.moe:
        return
    try:
        layers = get_submodule(model, plan.layers_path)
    except AttributeError:
        raise ConfigError(f"plan: the model has no {plan.layers_path!r}") from None
    for layer, block in sorted(plan.moe.items()):
        found = find_moe_block(layers[layer]) if layer < len(layers) else None
        if found is None:
            raise ConfigError(
                f"plan: layer {layer} of the model is not a MoE layer, but the plan puts experts or a "
                "router there; re-plan from this model's probe"
            )
        planned = [e.expert for e in plan.experts if e.layer == layer]
        if planned and max(planned) >= found.num_experts:
            raise ConfigError(
                f"plan: expert {max(planned)} of layer {layer} does not exist (the model's layer {layer} "
                f"has {found.num_experts} experts: 0..{found.num_experts - 1})"
            )
        if {b.path for b in block.banks} != {b.path for b in found.banks} or block.style != found.style:
            raise ConfigError(
                f"plan: layer {layer}'s expert banks {[b.path for b in block.banks]} differ from the "
                f"model's {[b.path for b in found.banks]}; re-plan from this model's probe"
            )


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
        if section.expert_forward == "routed":
            route_expert_lora(peft_model, plan)
        if any(block.style == "megablocks" for block in plan.moe.values()):
            attach_expert_lora(peft_model, plan)
    verify_adapters(peft_model, plan, section=section)
    if section.rewrites_base:
        keep_initial_factors(peft_model)
    return peft_model


INITIAL_FACTORS = "initial_lora_factors"  # attribute of a PeftModel whose init rewrote the base weights


def keep_initial_factors(peft_model: nn.Module) -> None:
    """Keep (on CPU) the starting factors of a PiSSA/OLoRA adapter: its export converts the trained adapter back to
    the original base from them (aletheia_ds/adapters/export.py). Taken right after attaching, before DeepSpeed
    partitions the adapter: ZeRO-3 then starts every rank from rank 0's factors, which are these on rank 0."""
    factors = {name: p.detach().to("cpu", copy=True) for name, p in peft_model.named_parameters() if "lora_" in name}
    empty = [name for name, t in factors.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"initial adapter factors: {empty[0]} is already partitioned; attach before the engine")
    setattr(peft_model, INITIAL_FACTORS, factors)


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
    for layer, experts, _, name in plan.expert_banks("hf"):
        unplanned = sorted(set(range(plan.moe[layer].num_experts)) - {e.expert for e in experts})
        a, b = _expert_factors(wrappers[name], adapter)
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
    norms.update(expert_lora_deltas(peft_model))  # megablocks banks
    return norms


def layer_update_norms(
    peft_model: nn.Module, layers_path: str, num_layers: int, adapter: str = "default"
) -> list[float]:
    """Per decoder layer: sqrt of the sum over its LoRA linears of ||scaling * B @ A||_F^2, what the adapters have
    learned there (the pilot rule places its cut from these; plan.pilot_plan). Under ZeRO-3 the caller gathers the
    factors first."""
    import re

    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    energy = [0.0] * num_layers
    for name, module in peft_model.named_modules():
        found = pattern.search(name)
        if found is None or adapter not in getattr(module, "lora_A", {}):
            continue
        delta = module.scaling[adapter] * (
            module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()
        )
        energy[int(found.group(1))] += float(delta.pow(2).sum())
    return [math.sqrt(e) for e in energy]


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


def verify_adapters(
    peft_model: nn.Module, plan: Plan, adapter: str = "default", section: LoraSection | None = None
) -> None:
    """Exactly the planned (layer, module) pairs carry adapters of the planned rank and alpha; nothing else trains;
    every adapter is the lora.variant asked for, with its scale, and DoRA's magnitudes are the row norms of the
    (gathered) base weights as attached."""
    param_keys = {(m.layer, m.key) for m in by_parameter(plan)}
    expected = {
        plan.module_name(m.layer, m.path): (m.r, m.alpha) for m in plan.modules if (m.layer, m.key) not in param_keys
    }
    expected.update(parameter_ranks(plan))
    found = adapter_modules(peft_model, adapter)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{name} r={found[name][0]} alpha={found[name][1]} (planned r={r} alpha={a})"
        for name, (r, a) in expected.items()
        if name in found and (found[name][0] != r or abs(found[name][1] - a) > 1e-9)
    )
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n)
    problems = _expert_problems(peft_model, plan, adapter) + _variant_problems(
        peft_model, section or LoraSection(), adapter
    )
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
    for layer, experts, _, name in plan.expert_banks("hf"):
        if name not in wrappers:
            continue  # reported as a missing adapter
        wrapper, num_experts, planned = wrappers[name], plan.moe[layer].num_experts, {e.expert for e in experts}
        if wrapper.num_experts != num_experts:
            problems.append(f"{name} adapts {wrapper.num_experts} experts, the plan expects {num_experts}")
            continue
        a, b = _expert_factors(wrapper, adapter)
        live = {e for e in range(num_experts) if a[e].abs().sum() > 0 or b[:, :, e].abs().sum() > 0}
        if live != planned:
            problems.append(f"{name} has adapters on experts {sorted(live)}, the plan on {sorted(planned)}")
    return problems + expert_lora_problems(peft_model, plan)


@torch.no_grad()
def _variant_problems(peft_model: nn.Module, section: LoraSection, adapter: str) -> list[str]:
    """Each LoRA layer's DoRA flag and scale are those of `section`; a DoRA magnitude equals ||W + s B A|| per output
    row, W gathered from its ZeRO-3 partitions (every rank runs this on the same layers, in the same order)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import gather_params_ctx

    dora, scale_wrong, magnitude_wrong = [], [], []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        r, alpha = module.r[adapter], module.lora_alpha[adapter]
        scale = alpha / math.sqrt(r) if section.use_rslora else alpha / r
        if not math.isclose(module.scaling[adapter], scale, rel_tol=1e-12):
            scale_wrong.append(f"{name} scale {module.scaling[adapter]:g} (want {scale:g})")
        if bool(module.use_dora.get(adapter)) != (section.variant == "dora"):
            dora.append(name)
        elif section.variant == "dora":
            base = module.get_base_layer()
            layer = module.lora_magnitude_vector[adapter]
            with gather_params_ctx(base.weight, modifier_rank=None):
                delta = (module.lora_B[adapter].weight.double() @ module.lora_A[adapter].weight.double()) * scale
                want = layer.get_weight_norm(base.weight.double(), delta, 1.0)  # delta as (out, in), as PEFT's
            got = layer.weight.detach().double()
            tolerance = max(1e-4, 8 * torch.finfo(layer.weight.dtype).eps)  # PEFT takes the norm in W's dtype
            if got.shape != want.shape or not torch.allclose(got, want, rtol=tolerance, atol=0):
                magnitude_wrong.append(name)
    problems = []
    if dora:
        problems.append(f"{len(dora)} adapters are not lora.variant={section.variant} (first: {dora[0]})")
    if scale_wrong:
        problems.append(f"{len(scale_wrong)} adapters have the wrong scale (first: {scale_wrong[0]})")
    if magnitude_wrong:
        problems.append(
            f"{len(magnitude_wrong)} DoRA magnitudes are not the base weight's row norms (first: {magnitude_wrong[0]})"
        )
    return problems
