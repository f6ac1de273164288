"""Per-family facts: where the decoder layers live and which linears are attention or MLP.

The one place in the package that knows module names. Known families are listed in FAMILIES; any other
causal LM whose decoder layers are a ModuleList with attention/MLP sub-blocks is found by the same
rules, and a model where nothing is found gets an error that lists what was there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch.nn as nn

from .config import ConfigError

# container names of the attention and MLP blocks inside one decoder layer
ATTENTION_BLOCKS = ("self_attn", "attention", "attn", "self_attention")
MLP_BLOCKS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# inside a MoE block these linears route tokens; they are not adapter targets
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

# model_type -> dotted path of the decoder-layer ModuleList (checked against the model at load time)
FAMILIES: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "olmoe": "model.layers",
    "deepseek_v2": "model.layers",
    "deepseek_v3": "model.layers",
}


@dataclass(frozen=True)
class TargetModule:
    key: str  # name in reports: "q_proj", "shared_expert.gate_proj"
    path: str  # path inside one decoder layer: "self_attn.q_proj"
    kind: str  # "attention" | "mlp"
    in_features: int = 0
    out_features: int = 0


@dataclass
class Layout:
    family: str
    layers_path: str
    layer_targets: list[list[TargetModule]] = field(default_factory=list)
    layer_params: list[int] = field(default_factory=list)  # all parameters of each decoder layer (cost model)
    hidden_size: int = 0
    vocab_size: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_targets)

    @property
    def layers_pattern(self) -> str:
        """What PEFT's `layers_pattern` must be to read the decoder-layer index."""
        return self.layers_path.rsplit(".", 1)[-1]

    def module_name(self, layer: int, target: TargetModule) -> str:
        return f"{self.layers_path}.{layer}.{target.path}"

    def kinds(self) -> dict[str, str]:
        return {t.key: t.kind for targets in self.layer_targets for t in targets}

    def paths(self) -> dict[str, str]:
        return {t.key: t.path for targets in self.layer_targets for t in targets}

    def iter_modules(self, model: nn.Module) -> Iterator[tuple[int, TargetModule, nn.Module]]:
        layers = get_submodule(model, self.layers_path)
        for index, targets in enumerate(self.layer_targets):
            for target in targets:
                yield index, target, layers[index].get_submodule(target.path)

    def shapes(self) -> dict[str, list[int]]:
        return {t.key: [t.in_features, t.out_features] for targets in self.layer_targets for t in targets}

    def to_json(self) -> dict:
        return {"family": self.family, "layers_path": self.layers_path, "module_kinds": self.kinds(),
                "module_paths": self.paths(), "module_shapes": self.shapes(), "layer_params": self.layer_params,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size}


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def _is_decoder_layer(layer: nn.Module) -> bool:
    names = {name for name, _ in layer.named_children()}
    return bool(names & set(ATTENTION_BLOCKS)) or bool(names & set(MLP_BLOCKS))


def find_layers_path(model: nn.Module) -> str:
    """The decoder-layer ModuleList: the family table first, else the longest list of decoder-like blocks."""
    known = FAMILIES.get(_model_type(model))
    if known:
        try:
            found = model.get_submodule(known)
            if isinstance(found, nn.ModuleList):
                return known
        except AttributeError:
            pass
    expected = _num_hidden_layers(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _is_decoder_layer(module[0]):
            candidates.append((len(module) == expected, len(module), name))
    if not candidates:
        classes = sorted({type(m).__name__ for m in model.modules()})[:40]
        raise ConfigError(
            f"model {type(model).__name__} ({_model_type(model)}): no decoder-layer list found "
            f"(a ModuleList of blocks with one of {ATTENTION_BLOCKS + MLP_BLOCKS}); module classes seen: "
            f"{', '.join(classes)}; add the family to aletheia_ds/arch.py FAMILIES")
    return max(candidates)[2]


def _classify(path: str) -> str | None:
    head = path.split(".", 1)[0]
    if head in ATTENTION_BLOCKS:
        return "attention"
    if head in MLP_BLOCKS:
        return "mlp"
    return None


def _is_router(layer: nn.Module, path: str) -> bool:
    parts = path.split(".")
    if parts[-1] not in ROUTER_NAMES:
        return False
    parent = layer.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else layer
    return hasattr(parent, "experts") or parts[-1] == "shared_expert_gate"


def layer_targets(layer: nn.Module) -> list[TargetModule]:
    targets = []
    for path, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or "experts." in path + ".":
            continue  # per-expert weights are handled by the MoE path, not as plain linears
        kind = _classify(path)
        if kind is None or _is_router(layer, path):
            continue
        key = path.split(".", 1)[1]
        targets.append(TargetModule(key=key, path=path, kind=kind, in_features=module.in_features,
                                    out_features=module.out_features))
    return targets


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions keep the full size in ds_numel


def describe(model: nn.Module, only: list[str] | None = None) -> Layout:
    """Find the decoder layers and their adapter targets; `only` restricts to the given module keys."""
    layers_path = find_layers_path(model)
    layers = model.get_submodule(layers_path)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout = Layout(family=_model_type(model), layers_path=layers_path,
                    layer_targets=[layer_targets(layer) for layer in layers],
                    layer_params=[sum(_numel(p) for p in layer.parameters()) for layer in layers],
                    hidden_size=int(getattr(text, "hidden_size", 0) or 0),
                    vocab_size=int(getattr(text, "vocab_size", 0) or 0))
    available = sorted(layout.kinds())
    if not available:
        names = sorted({name for name, m in layers[0].named_modules() if name})
        raise ConfigError(
            f"no target linears found in {layers_path}[0] of {type(model).__name__}; modules there: "
            f"{', '.join(names)}; add the family to aletheia_ds/arch.py")
    if only:
        unknown = [k for k in only if k not in available]
        if unknown:
            raise ConfigError(f"lora.target_modules: {unknown} not found; modules of this model: {available}")
        layout.layer_targets = [[t for t in targets if t.key in only] for targets in layout.layer_targets]
    return layout


