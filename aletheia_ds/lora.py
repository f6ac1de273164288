"""Plan -> peft.LoraConfig; attach; verify that exactly the planned modules got adapters of the planned rank.

PEFT matches `target_modules` by name suffix, `layers_to_transform` by a regex on the layer index, and
silently ignores `rank_pattern` keys that match nothing. The fields below use layer-relative paths
("self_attn.q_proj", never a bare "gate_proj" that would also hit "shared_expert.gate_proj") and an
explicit `layers_pattern`; `verify_adapters` then checks the result module by module, by name built
from the model's own layout, so a silent mismatch becomes an error.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn as nn

from .config import ConfigError, LoraSection
from .plan import Plan


def _pattern(values: dict[str, float], default: float) -> dict[str, float]:
    return {re.escape(path): value for path, value in sorted(values.items()) if value != default}


def lora_config_fields(plan: Plan) -> dict:
    """The exact LoraConfig fields of a plan (also written into plan.json)."""
    paths = sorted({m.path for m in plan.modules})
    r = Counter(m.r for m in plan.modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in plan.modules).most_common(1)[0][0]
    by_path_r: dict[str, set] = {}
    by_path_alpha: dict[str, set] = {}
    for m in plan.modules:
        by_path_r.setdefault(m.path, set()).add(m.r)
        by_path_alpha.setdefault(m.path, set()).add(m.alpha)
    rank_pattern: dict[str, float] = {}
    alpha_pattern: dict[str, float] = {}
    # one key per module path when its rank is the same in every planned layer, else one per full name
    for m in plan.modules:
        name = f"{plan.layers_path}.{m.layer}.{m.path}"
        if len(by_path_r[m.path]) > 1 and m.r != r:
            rank_pattern[re.escape(name)] = m.r
        if len(by_path_alpha[m.path]) > 1 and m.alpha != alpha:
            alpha_pattern[re.escape(name)] = m.alpha
    rank_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_r.items() if len(v) == 1}, r))
    alpha_pattern.update(_pattern({p: next(iter(v)) for p, v in by_path_alpha.items() if len(v) == 1}, alpha))
    planned = {(m.layer, m.path) for m in plan.modules}
    exclude = sorted(f"{plan.layers_path}.{layer}.{path}" for layer in plan.layers for path in paths
                     if (layer, path) not in planned)
    return {"r": int(r), "lora_alpha": float(alpha), "target_modules": paths, "layers_to_transform": plan.layers,
            "layers_pattern": plan.layers_path.rsplit(".", 1)[-1], "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "exclude_modules": exclude or None}


def build_lora_config(plan: Plan, section: LoraSection | None = None):
    from peft import LoraConfig

    section = section or LoraSection()
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=section.dropout, bias="none",
                      **lora_config_fields(plan))


def attach(model: nn.Module, plan: Plan, section: LoraSection | None = None):
    """Wrap `model` with the plan's adapters (same initial weights on every rank) and verify them."""
    from peft import get_peft_model

    section = section or LoraSection()
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        # every rank must create identical adapter weights: ZeRO-3 partitions each rank's own copy
        torch.manual_seed(section.init_seed)
        peft_model = get_peft_model(model, build_lora_config(plan, section))
    verify_adapters(peft_model, plan)
    return peft_model


def adapter_modules(peft_model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """{module name without the PEFT prefix: (rank, alpha)} for every LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            short = name.removeprefix("base_model.model.")
            r = module.r[adapter]
            found[short] = (r, module.lora_alpha[adapter])
    return found


def verify_adapters(peft_model: nn.Module, plan: Plan, adapter: str = "default") -> None:
    """Exactly the planned (layer, module) pairs carry adapters of the planned rank and alpha; nothing else trains."""
    expected = {f"{plan.layers_path}.{m.layer}.{m.path}": (m.r, m.alpha) for m in plan.modules}
    found = adapter_modules(peft_model, adapter)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{name} r={found[name][0]} alpha={found[name][1]} (planned r={r} alpha={a})"
                   for name, (r, a) in expected.items() if name in found and
                   (found[name][0] != r or abs(found[name][1] - a) > 1e-9))
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n)
    problems = []
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
