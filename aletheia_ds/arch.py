"""Per-family facts: where the decoder layers live, which linears are attention or MLP, where MoE experts are.

The one place in the package that knows module names. Known families are listed in FAMILIES; any other
causal LM whose decoder layers are a ModuleList with attention/MLP sub-blocks is found by the same
rules, and a model where nothing is found gets an error that lists what was there.

Mixture-of-experts layers come in two known forms (`find_moe_block`):
  hf          transformers 5: an `experts` module holding fused 3-D banks (E, out, in), e.g.
              `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), next to a router `gate`/`router` whose
              first output is the router logits x W^T (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ...)
  megablocks  a megablocks `dMoE`: router `router.layer` (Linear H -> E) and experts `experts.mlp` with
              2-D weights w1, v1 (GLU only), w2 of shape (E * F, H); expert e owns rows e*F .. (e+1)*F
Shared experts (`shared_expert`, `shared_experts`) are plain MLP linears and stay ordinary targets.
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
# MoE block parts (see the module docstring)
EXPERTS_NAME = "experts"
ROUTER_BLOCKS = ("gate", "router")
SHARED_EXPERT_BLOCKS = ("shared_expert", "shared_experts")
HF_BANKS = ("gate_up_proj", "up_proj", "down_proj")  # fused 3-D banks, in the order the experts apply them
MEGABLOCKS_BANKS = ("w1", "v1", "w2")
# config fields that announce experts: a model that has them but no known MoE block is refused
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

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


@dataclass(frozen=True)
class ExpertBank:
    """One fused weight holding every expert's copy of one linear; per expert it maps in -> out features."""

    name: str  # "gate_up_proj", "down_proj" (hf); "w1", "v1", "w2" (megablocks)
    path: str  # path of the parameter inside one decoder layer: "mlp.experts.gate_up_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class MoeBlock:
    """Where one decoder layer's experts and router live (paths inside the layer)."""

    style: str  # "hf" | "megablocks"
    path: str  # the MoE block: "mlp" (DeepSpeed ZeRO-3 treats it as one leaf)
    experts_path: str  # "mlp.experts"
    router_path: str  # the module whose first output is the router logits: "mlp.gate" / "mlp.router.layer"
    num_experts: int
    top_k: int
    banks: tuple[ExpertBank, ...]
    block_class: str

    def to_json(self) -> dict:
        return {
            "style": self.style,
            "path": self.path,
            "experts_path": self.experts_path,
            "router_path": self.router_path,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "banks": [[b.name, b.path, b.in_features, b.out_features] for b in self.banks],
            "block_class": self.block_class,
        }

    @classmethod
    def from_json(cls, blob: dict) -> "MoeBlock":
        return cls(
            style=str(blob["style"]),
            path=str(blob["path"]),
            experts_path=str(blob["experts_path"]),
            router_path=str(blob["router_path"]),
            num_experts=int(blob["num_experts"]),
            top_k=int(blob.get("top_k", 0)),
            block_class=str(blob.get("block_class", "")),
            banks=tuple(ExpertBank(str(n), str(p), int(i), int(o)) for n, p, i, o in blob["banks"]),
        )


@dataclass
class Layout:
    family: str
    layers_path: str
    layer_targets: list[list[TargetModule]] = field(default_factory=list)
    layer_params: list[int] = field(default_factory=list)  # all parameters of each decoder layer (cost model)
    hidden_size: int = 0
    vocab_size: int = 0
    moe: dict[int, MoeBlock] = field(default_factory=dict)  # decoder layer -> its MoE block (MoE layers only)

    @property
    def num_layers(self) -> int:
        return len(self.layer_targets)

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

    def shared_expert_keys(self) -> list[str]:
        return sorted({t.key for targets in self.layer_targets for t in targets if is_shared_expert(t.path)})

    def iter_moe(self, model: nn.Module) -> Iterator[tuple[int, MoeBlock, nn.Module]]:
        """(layer index, MoE facts, the decoder layer module) for every MoE layer."""
        layers = get_submodule(model, self.layers_path)
        for index in sorted(self.moe):
            yield index, self.moe[index], layers[index]

    def moe_block_classes(self, model: nn.Module) -> list[type]:
        """The MoE block classes present: DeepSpeed ZeRO-3 must fetch each block's weights as one leaf."""
        classes = {type(layer.get_submodule(block.path)) for _, block, layer in self.iter_moe(model)}
        return sorted(classes, key=lambda c: c.__qualname__)

    def to_json(self) -> dict:
        blob = {
            "family": self.family,
            "layers_path": self.layers_path,
            "module_kinds": self.kinds(),
            "module_paths": self.paths(),
            "module_shapes": self.shapes(),
            "layer_params": self.layer_params,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
        if self.moe:
            blob["moe"] = {str(layer): block.to_json() for layer, block in sorted(self.moe.items())}
            blob["shared_expert_keys"] = self.shared_expert_keys()
        return blob


def moe_from_json(layout_blob: dict) -> dict[int, MoeBlock]:
    """The MoE blocks recorded in probe.json's layout (planning needs no model)."""
    return {int(k): MoeBlock.from_json(v) for k, v in (layout_blob.get("moe") or {}).items()}


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
            f"{', '.join(classes)}; add the family to aletheia_ds/arch.py FAMILIES"
        )
    return max(candidates)[2]


def _classify(path: str) -> str | None:
    head = path.split(".", 1)[0]
    if head in ATTENTION_BLOCKS:
        return "attention"
    if head in MLP_BLOCKS:
        return "mlp"
    return None


def _is_router(layer: nn.Module, path: str) -> bool:
    """A router linear (`gate`, `router`, or a linear inside one, as megablocks' `router.layer`)."""
    parts = path.split(".")
    if parts[-1] == "shared_expert_gate":
        return True
    for depth, part in enumerate(parts):
        if part in ROUTER_NAMES:
            parent = layer.get_submodule(".".join(parts[:depth])) if depth else layer
            if hasattr(parent, EXPERTS_NAME):
                return True
    return False


def is_shared_expert(path: str) -> bool:
    return any(part in SHARED_EXPERT_BLOCKS for part in path.split("."))


def _shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 partitions keep the full shape in ds_shape


def _is_megablocks_moe(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("megablocks.") and cls.__name__ in ("dMoE", "MoE")


def _hf_moe_block(layer: nn.Module, path: str, block: nn.Module) -> MoeBlock | None:
    experts = getattr(block, EXPERTS_NAME, None)
    if not isinstance(experts, nn.Module) or isinstance(experts, nn.ModuleList):
        return None
    banks_present = [
        name
        for name in HF_BANKS
        if isinstance(getattr(experts, name, None), nn.Parameter) and len(_shape(getattr(experts, name))) == 3
    ]
    router_name = next((n for n in ROUTER_BLOCKS if isinstance(getattr(block, n, None), nn.Module)), None)
    if not banks_present or router_name is None:
        return None
    transposed = bool(getattr(experts, "is_transposed", False))
    banks = []
    for name in banks_present:
        num_experts, rows, cols = _shape(getattr(experts, name))
        d_in, d_out = (rows, cols) if transposed else (cols, rows)
        banks.append(ExpertBank(name, f"{path}.{EXPERTS_NAME}.{name}", d_in, d_out))
    config = getattr(experts, "config", None)
    top_k = getattr(getattr(block, router_name), "top_k", None) or getattr(config, "num_experts_per_tok", 0)
    return MoeBlock(
        style="hf",
        path=path,
        experts_path=f"{path}.{EXPERTS_NAME}",
        router_path=f"{path}.{router_name}",
        num_experts=int(num_experts),
        top_k=int(top_k or 0),
        banks=tuple(banks),
        block_class=type(block).__name__,
    )


def _megablocks_moe_block(path: str, block: nn.Module) -> MoeBlock:
    args = block.experts.args
    mlp = block.experts.mlp
    if getattr(args, "moe_expert_model_parallelism", False):
        raise ConfigError(
            f"{path}: megablocks expert model parallelism is not supported (each rank must hold "
            "every expert); set moe_expert_model_parallelism=False"
        )
    num_experts = int(args.moe_num_experts)
    hidden = int(args.hidden_size)
    ffn = _shape(mlp.w1)[0] // num_experts
    banks = [ExpertBank("w1", f"{path}.experts.mlp.w1", hidden, ffn)]
    if isinstance(getattr(mlp, "v1", None), nn.Parameter):
        banks.append(ExpertBank("v1", f"{path}.experts.mlp.v1", hidden, ffn))
    banks.append(ExpertBank("w2", f"{path}.experts.mlp.w2", ffn, hidden))
    return MoeBlock(
        style="megablocks",
        path=path,
        experts_path=f"{path}.experts",
        router_path=f"{path}.router.layer",
        num_experts=num_experts,
        top_k=int(args.moe_top_k),
        banks=tuple(banks),
        block_class=type(block).__name__,
    )


def find_moe_block(layer: nn.Module) -> MoeBlock | None:
    """The MoE block of one decoder layer in a known form (module docstring), or None."""
    for path, module in layer.named_modules():
        if not path or path.split(".", 1)[0] not in MLP_BLOCKS:
            continue
        if _is_megablocks_moe(module):
            return _megablocks_moe_block(path, module)
        found = _hf_moe_block(layer, path, module)
        if found is not None:
            return found
    return None


def _announces_experts(model: nn.Module) -> str | None:
    """Why the model looks like a mixture of experts (config fields or modules named experts), if it does."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in EXPERT_COUNT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 1:
            return f"config.{name}={value}"
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] == EXPERTS_NAME:
            return f"module {name}"
    return None


def _unknown_moe_error(model: nn.Module, layers: nn.ModuleList, why: str) -> ConfigError:
    layer = layers[len(layers) - 1]
    mlp = next((m for n, m in layer.named_children() if n in MLP_BLOCKS), layer)
    classes = sorted({f"{n or '.'}: {type(m).__name__}" for n, m in mlp.named_modules() if "." not in n})
    return ConfigError(
        f"model {type(model).__name__} ({_model_type(model)}) has experts ({why}) but its MoE layout is not known; "
        f"classes in the last decoder layer's MLP block: {'; '.join(classes)}; known forms: an `experts` module with "
        f"3-D banks {HF_BANKS} beside a router {ROUTER_BLOCKS}, or a megablocks dMoE; to add the family, teach "
        "aletheia_ds/arch.py find_moe_block where its experts, banks and router live"
    )


def layer_targets(layer: nn.Module) -> list[TargetModule]:
    targets = []
    for path, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or EXPERTS_NAME in path.split("."):
            continue  # per-expert weights are handled by the MoE path, not as plain linears
        kind = _classify(path)
        if kind is None or _is_router(layer, path):
            continue
        key = path.split(".", 1)[1]
        targets.append(
            TargetModule(
                key=key, path=path, kind=kind, in_features=module.in_features, out_features=module.out_features
            )
        )
    return targets


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions keep the full size in ds_numel


def describe(model: nn.Module, only: list[str] | None = None) -> Layout:
    """Find the decoder layers and their adapter targets; `only` restricts to the given module keys."""
    layers_path = find_layers_path(model)
    layers = model.get_submodule(layers_path)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layout = Layout(
        family=_model_type(model),
        layers_path=layers_path,
        layer_targets=[layer_targets(layer) for layer in layers],
        layer_params=[sum(_numel(p) for p in layer.parameters()) for layer in layers],
        hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
    )
    for index, layer in enumerate(layers):
        block = find_moe_block(layer)
        if block is not None:
            layout.moe[index] = block
    if not layout.moe:
        why = _announces_experts(model)
        if why:
            raise _unknown_moe_error(model, layers, why)
    available = sorted(layout.kinds())
    if not available:
        names = sorted({name for name, m in layers[0].named_modules() if name})
        raise ConfigError(
            f"no target linears found in {layers_path}[0] of {type(model).__name__}; modules there: "
            f"{', '.join(names)}; add the family to aletheia_ds/arch.py"
        )
    if only:
        unknown = [k for k in only if k not in available]
        if unknown:
            raise ConfigError(f"lora.target_modules: {unknown} not found; modules of this model: {available}")
        layout.layer_targets = [[t for t in targets if t.key in only] for targets in layout.layer_targets]
    return layout
