"""Merge an adapter into its base model and write a plain transformers model (safetensors) for serving.

    aletheia-ds export --model DIR --adapter RUN/adapter --out merged/ --merge

Streams: the base checkpoint is read one safetensors shard at a time, in its own dtype; each tensor of the
shard that an adapter touches gets its delta added (computed in float32 from the adapter's factors, then
cast back), and the shard is written under the same name, with the index copied. Peak host memory is one
shard plus the adapter (the deltas of one shard at a time); no GPU and no model instance with real weights.

Deltas are worked out on the model's in-memory names (a weightless "meta" skeleton with the PEFT adapter
loaded on it) and mapped to the checkpoint's names with transformers' own `revert_weight_conversion`: a
fused expert bank (E, 2F, H) of a Mixtral/Qwen3-MoE model is stored per expert on disk, and its delta is
split the same way. Kinds of delta:
  - PEFT LoRA on linears:                      s * B A                         (s = alpha / r, or / sqrt(r))
  - PEFT `target_parameters` on fused banks:    per expert s * B_e A_e          (PEFT's ParamWrapper layout)
  - megablocks per-expert LoRA (expert_adapter.json): aletheia_ds.adapters.experts.ExpertLoRA on the 2-D bank
  - DoRA (use_dora) on linears:                 m / ||W + s B A||_row * (W + s B A)   (needs the shard's W)
A PiSSA/OLoRA adapter needs nothing of its own: the training run exports it converted to a plain LoRA on the
original base (aletheia_ds/adapters/export.py).
Everything is written to a temporary directory beside `out` and renamed into place: a failure leaves nothing
behind.
This is the export of a merged model; the adapter directory it reads is the adapter export of a training run
(aletheia_ds/adapters/export.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .adapters.export import check_adapter_fits
from .config import ConfigError
from .io import atomic_dir
from .model import check_safetensors_shards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_dtype(model_dir: str) -> str:
    """The dtype the base checkpoint was saved in (config.json `dtype` / `torch_dtype`), else float32."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in DTYPES else "float32"


def check_export_args(model: str, adapter: str, out: str, overwrite: bool) -> None:
    if not (Path(model) / "config.json").is_file():
        raise ConfigError(f"--model: {model!r} has no config.json")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter!r} has no adapter_config.json")
    target = Path(out).resolve()
    if target in (Path(model).resolve(), Path(adapter).resolve()):
        raise ConfigError(f"--out: {out!r} is the model or adapter directory; choose a new directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"--out: {out!r} exists and is not empty; choose a new directory or pass --overwrite")
    check_safetensors_shards(model, "--model")


def shard_files(model_dir: str | Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} of a safetensors checkpoint (sharded with an index, or one file)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(file, []).append(name)
        return shards
    if (model_dir / SINGLE_FILE).is_file():
        with safe_open(str(model_dir / SINGLE_FILE), "pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    raise ConfigError(
        f"--model: {str(model_dir)!r} has no {SINGLE_FILE} or {INDEX_FILE}; the merge streams "
        "safetensors shards (convert *.bin checkpoints with save_pretrained(safe_serialization=True))"
    )


# ------------------------------------------------------------------------------------------------- deltas
DeltaFn = Callable[[], torch.Tensor]


RescaleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (base weight, delta) -> merged weight


def _peft_deltas(
    model_dir: str, adapter: str, trust_remote_code: bool = False
) -> tuple[dict[str, DeltaFn], dict[str, RescaleFn], torch.nn.Module]:
    """{in-memory parameter name: delta in float32} for every tensor the PEFT adapter adapts, {name: DoRA merge}
    for the DoRA ones, and the weightless skeleton (revert_weight_conversion reads the family's key mappings
    from it)."""
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # names and shapes only: no base weights are ever held
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # the wrapped skeleton gives each adapted tensor's scaling and layout; its factors stay weightless (meta),
    # so they are read from the adapter file by PEFT's saved names
    check_adapter_fits(skeleton, adapter)
    peft_model = PeftModel.from_pretrained(skeleton, adapter, low_cpu_mem_usage=True)
    name = peft_model.active_adapter
    factors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    deltas: dict[str, DeltaFn] = {}
    dora: dict[str, RescaleFn] = {}
    for module_name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        a, b = (factors[f"base_model.model.{module_name}.lora_{part}.weight"] for part in "AB")
        owner = _unwrapped(module_name)
        if isinstance(layer, ParamWrapper):
            deltas[f"{owner}.{layer.parameter_name}"] = lambda layer=layer, a=a, b=b: _bank_delta(layer, name, a, b)
        else:
            deltas[f"{owner}.weight"] = lambda layer=layer, a=a, b=b: _linear_delta(layer, name, a, b)
        if layer.use_dora.get(name):
            magnitude = factors[f"base_model.model.{module_name}.lora_magnitude_vector"]
            dora[f"{owner}.weight"] = lambda w, d, layer=layer, m=magnitude: _dora_merged(layer, name, m, w, d)
    return deltas, dora, skeleton


def _unwrapped(name: str) -> str:
    """A name inside the PEFT-wrapped model -> the plain model's name (PEFT nests the base as `base_layer`)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _linear_delta(layer, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    delta = b.float() @ a.float()
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[name]


def _dora_merged(layer, name: str, magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m / ||W + dW||_row * (W + dW), as PEFT's DoraLinearVariant.merge_safe forms it (the
    norm by PEFT's own get_weight_norm), from the base weight of the shard and the adapter's magnitude."""
    from peft.utils.other import transpose

    norm = layer.lora_magnitude_vector[name].get_weight_norm(weight, transpose(delta, layer.fan_in_fan_out), 1)
    factor = transpose((magnitude.float() / norm).view(-1, 1), layer.fan_in_fan_out)
    return factor * (weight + delta)


def _bank_delta(layer, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's ParamWrapper.get_delta_weight without its cast onto the (here weightless) parameter."""
    a, b = a.float(), b.float()
    if layer.num_experts == 1:
        return (b @ a) * layer.scaling[name]
    a = a.reshape(layer.num_experts, -1, a.shape[-1])  # experts x rank x in
    b = b.reshape(b.shape[0], -1, layer.num_experts)  # out x rank x experts
    order = "e o i" if layer._did_swap_in_out_features else "e i o"
    return torch.einsum(f"o r e, e r i -> {order}", b, a) * layer.scaling[name]


def _expert_deltas(adapter: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{bank parameter: weight -> merged weight} for megablocks per-expert LoRA (empty without one)."""
    from safetensors.torch import load_file

    from .adapters.experts import CONFIG_FILE, WEIGHTS_FILE, ExpertLoRA

    path = Path(adapter) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        banks = json.loads(path.read_text(encoding="utf-8"))["banks"]
        tensors = load_file(str(Path(adapter) / WEIGHTS_FILE))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: cannot read the expert adapter ({type(err).__name__}: {err})") from None
    merges = {}
    for spec in banks:
        lora = ExpertLoRA.from_spec(spec)
        with torch.no_grad():
            lora.lora_A.copy_(tensors[f"{spec['parameter']}.lora_A"])
            lora.lora_B.copy_(tensors[f"{spec['parameter']}.lora_B"])
        merges[spec["parameter"]] = lambda weight, lora=lora: lora(weight.float())
    return merges


def _on_disk(skeleton, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names -> the checkpoint's names (fused expert banks split back per expert)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(skeleton, dict(deltas)))


def _key_map(skeleton, deltas: dict[str, DeltaFn]) -> dict[str, list[str]]:
    """{in-memory name: [checkpoint names]}, found by reverting meta tensors of the parameters' shapes."""
    shapes = {_unwrapped(name): p.shape for name, p in skeleton.named_parameters()}
    return {name: list(_on_disk(skeleton, {name: torch.empty(shapes[name], device="meta")})) for name in deltas}


# ------------------------------------------------------------------------------------------------- merge
def merged_shards(
    model: str, adapter: str, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(shard file name, its merged tensors) one shard at a time; every adapted tensor is visited once."""
    from safetensors import safe_open

    shards = shard_files(model)
    peft, dora, skeleton = _peft_deltas(model, adapter, trust_remote_code)
    experts = _expert_deltas(adapter)
    disk_names = _key_map(skeleton, peft)
    owner_of = {disk: name for name, disks in disk_names.items() for disk in disks}
    # DoRA rescales whole rows of the weight it adapts: only a tensor stored under one name can be merged here
    stored_split = sorted(name for name in dora if len(disk_names[name]) != 1)
    if stored_split:
        raise ConfigError(
            f"--adapter: DoRA on {stored_split[0]}, which the checkpoint stores split; merge it with PEFT"
        )
    dora = {disk_names[name][0]: rescale for name, rescale in dora.items()}
    present = {name for names in shards.values() for name in names}
    missing = sorted(set(owner_of) - present) + sorted(set(experts) - present)
    if missing:
        raise ConfigError(
            f"--adapter: adapts {missing[0]} ({len(missing)} tensors in all), which the base "
            f"checkpoint {model!r} does not hold; is it the adapter of this model?"
        )
    for file, names in sorted(shards.items()):
        in_shard = set(names)
        split: dict[str, torch.Tensor] = {}  # a fused bank's delta, split as stored, waiting for its other tensors
        tensors = {}
        with safe_open(str(Path(model) / file), "pt") as handle:
            for name in names:
                weight = handle.get_tensor(name)  # a view of the mapped file: no copy until merged
                stored = dtype if dtype is not None and weight.is_floating_point() else weight.dtype
                if name in owner_of and name not in split:
                    # one parameter's delta at a time, in float32: a shard's worth at once would be twice the shard
                    deltas = _on_disk(skeleton, {owner_of[name]: peft[owner_of[name]]()})
                    split.update((key, delta) for key, delta in deltas.items() if key in in_shard)
                    del deltas  # the pieces stored in other shards (a bank split across shards is recomputed there)
                if name in split:
                    delta = split.pop(name).reshape(weight.shape)
                    weight = (dora[name](weight.float(), delta) if name in dora else weight.float().add_(delta)).to(
                        stored
                    )
                elif name in experts:
                    weight = experts[name](weight).to(stored)
                tensors[name] = weight.to(stored).contiguous()
        yield file, tensors
        del tensors


def export_merged(
    model: str,
    adapter: str,
    out: str,
    tokenizer: Optional[str] = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """base + adapter -> one merged model directory (config.json, model*.safetensors, index, tokenizer files)."""
    from safetensors.torch import save_file

    check_export_args(model, adapter, out, overwrite)
    dtype = checkpoint_dtype(model) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    shard_files(model)  # a .bin-only base fails here, before anything is written
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    config["use_cache"] = True  # training turned the KV cache off; serving wants it
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    with atomic_dir(out) as tmp:  # an existing (empty, or --overwrite) directory is replaced whole
        for file, tensors in merged_shards(model, adapter, DTYPES[dtype], trust_remote_code):
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors  # else this shard stays alive while the generator reads the next
        if (Path(model) / INDEX_FILE).is_file():
            index = json.loads((Path(model) / INDEX_FILE).read_text(encoding="utf-8"))
            sizes = [f.stat().st_size for f in tmp.glob("*.safetensors")]
            index.setdefault("metadata", {})["total_size"] = sum(sizes)
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if (Path(model) / "generation_config.json").is_file():
            shutil.copy2(Path(model) / "generation_config.json", tmp / "generation_config.json")
        if tokenizer or any((Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            from .data import load_tokenizer

            load_tokenizer(tokenizer or model, trust_remote_code).save_pretrained(str(tmp))
    return Path(out)
