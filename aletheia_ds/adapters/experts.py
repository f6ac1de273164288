"""Per-expert LoRA on megablocks dMoE banks and its loader (aletheia_ds/adapters/export.py writes it beside
the PEFT adapter).

megablocks keeps each expert bank as one 2-D parameter of shape (E*F, H): in `w1` and `v1` expert e's rows
e*F .. (e+1)*F map x -> x W_e^T (in H, out F); in `w2` they map a -> a W_e (in F, out H). PEFT would see one
matrix and put one LoRA across all experts, so here each planned expert gets factors of its own, applied
through a torch parametrization of the bank (the way PEFT's ParamWrapper adapts parameters, but per
expert):

    W  ->  W + scatter over planned experts e of  s * (B_e A_e)      (transposed for w2), s = alpha / r

Unplanned experts have no adapter parameters at all. Initialisation follows PEFT's LoRA (A Kaiming-uniform,
B zero), so the adapted model starts equal to the base.

Saved as two files in the adapter directory (PEFT's own files hold the other adapters):
    expert_adapter.json          {"format": "aletheia_ds.adapters.experts", "version": 1, "banks": [
                                    {"parameter": "model.layers.3.mlp.experts.mlp.w1", "num_experts": 8,
                                     "experts": [1, 5], "r": 16, "alpha": 32.0, "in_features": H,
                                     "out_features": F, "transposed": false}, ...]}
    expert_adapter.safetensors   "<parameter>.lora_A" (n, r, in) and "<parameter>.lora_B" (n, out, r),
                                 row i belonging to experts[i]
Loader (after PEFT has loaded the rest, or on a bare model):
    from aletheia_ds.adapters.experts import load_expert_adapter
    model = PeftModel.from_pretrained(base, adapter_dir); load_expert_adapter(model, adapter_dir)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..config import ConfigError

FORMAT = "aletheia_ds.adapters.experts"
CONFIG_FILE = "expert_adapter.json"
WEIGHTS_FILE = "expert_adapter.safetensors"


class ExpertLoRA(nn.Module):
    """Parametrization of a (E*F, H) bank: adds s * B_e A_e to the rows of each planned expert e."""

    def __init__(
        self,
        num_experts: int,
        experts: list[int],
        r: int,
        alpha: float,
        in_features: int,
        out_features: int,
        transposed: bool,
    ):
        super().__init__()
        self.num_experts, self.experts = num_experts, sorted(experts)
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.in_features, self.out_features, self.transposed = in_features, out_features, transposed
        self.register_buffer("index", torch.tensor(self.experts, dtype=torch.long), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(len(self.experts), r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(len(self.experts), out_features, r))
        for block in self.lora_A.data:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # PEFT's default LoRA A initialisation

    @classmethod
    def from_spec(cls, spec: dict) -> "ExpertLoRA":
        """From one bank's entry of expert_adapter.json."""
        return cls(
            spec["num_experts"],
            spec["experts"],
            spec["r"],
            spec["alpha"],
            spec["in_features"],
            spec["out_features"],
            spec["transposed"],
        )

    def deltas(self) -> torch.Tensor:
        """(n, out, in): each planned expert's update of its linear map."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.deltas()
        if self.transposed:
            delta = delta.transpose(1, 2)  # w2 rows hold W_e with a -> a W_e: the update of the map, transposed
        per_expert = weight.view(self.num_experts, -1, weight.shape[-1])
        return per_expert.index_add(0, self.index.to(weight.device), delta.to(weight.dtype)).view_as(weight)

    def describe(self, parameter: str) -> dict:
        return {
            "parameter": parameter,
            "num_experts": self.num_experts,
            "experts": self.experts,
            "r": self.r,
            "alpha": self.alpha,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "transposed": self.transposed,
        }


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (module names as in the plan), or the model itself."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "peft_config") else model


def add_expert_lora(model: nn.Module, parameter: str, spec: dict) -> ExpertLoRA:
    owner_path, name = parameter.rsplit(".", 1)
    try:
        owner = _base(model).get_submodule(owner_path)
    except AttributeError:
        raise ConfigError(f"expert adapter: the model has no {owner_path!r} (for {parameter})") from None
    weight = getattr(owner, name)
    shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)
    rows = spec["num_experts"] * (spec["in_features"] if spec["transposed"] else spec["out_features"])
    if len(shape) != 2 or shape[0] != rows:
        raise ConfigError(
            f"expert adapter: {parameter} has shape {list(shape)}, expected ({rows}, ...) for "
            f"{spec['num_experts']} experts"
        )
    lora = ExpertLoRA.from_spec(spec).to(weight.device)
    parametrize.register_parametrization(owner, name, lora, unsafe=True)
    owner.parametrizations[name].original.requires_grad_(False)
    return lora


def attach_expert_lora(model: nn.Module, plan) -> None:
    """Per-expert LoRA on every megablocks bank with planned experts (the rest of the plan is PEFT's)."""
    for layer, experts, bank, name in plan.expert_banks("megablocks"):
        spec = {
            "num_experts": plan.moe[layer].num_experts,
            "experts": [e.expert for e in experts],
            "r": experts[0].r,
            "alpha": experts[0].alpha,
            "in_features": bank.in_features,
            "out_features": bank.out_features,
            "transposed": bank.name == "w2",
        }
        add_expert_lora(model, name, spec)


def expert_loras(model: nn.Module) -> dict[str, ExpertLoRA]:
    """{bank parameter name (as in the plan): its ExpertLoRA}."""
    found = {}
    for name, module in _base(model).named_modules():
        if isinstance(module, ExpertLoRA):
            owner, _, rest = name.partition(".parametrizations.")
            found[f"{owner}.{rest.split('.')[0]}"] = module
    return found


@torch.no_grad()
def expert_lora_deltas(model: nn.Module) -> dict[str, list[float]]:
    """{bank parameter name: [||delta_e||_F for every expert e]} (zero for experts without an adapter)."""
    norms = {}
    for name, lora in expert_loras(model).items():
        values = [0.0] * lora.num_experts
        for row, delta in zip(lora.experts, lora.deltas().double()):
            values[row] = float(delta.norm())
        norms[name] = values
    return norms


def expert_lora_problems(model: nn.Module, plan) -> list[str]:
    expected = {
        name: ([e.expert for e in experts], experts[0].r) for _, experts, _, name in plan.expert_banks("megablocks")
    }
    found = {name: (lora.experts, lora.r) for name, lora in expert_loras(model).items()}
    problems = [
        f"{name} has expert adapters {found.get(name)}, the plan {want}"
        for name, want in expected.items()
        if found.get(name) != (sorted(want[0]), want[1])
    ]
    problems += [f"{name} has expert adapters the plan does not name" for name in sorted(set(found) - set(expected))]
    return problems


@torch.no_grad()
def load_expert_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Attach the per-expert LoRA saved in `directory` to `model` (bare or PEFT-wrapped); returns the banks."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        return []
    try:
        blob = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if blob.get("format") != FORMAT:
            raise ValueError(f"format is {blob.get('format')!r}, not {FORMAT!r}")
        banks = blob["banks"]
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ConfigError(f"{directory / CONFIG_FILE}: cannot read the expert adapter ({err})") from None
    for spec in banks:
        lora = add_expert_lora(model, spec["parameter"], spec)
        lora.lora_A.copy_(tensors[f"{spec['parameter']}.lora_A"])
        lora.lora_B.copy_(tensors[f"{spec['parameter']}.lora_B"])
    return [spec["parameter"] for spec in banks]
