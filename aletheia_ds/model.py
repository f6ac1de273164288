"""Build the frozen base model from a local directory (under zero.Init when ZeRO-3 is on)."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, ModelSection

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


# where families record the longest sequence they were built for (GPT-NeoX/GPT-2 index a position table)
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def has_weights(path: str | Path) -> bool:
    return any(any(Path(path).glob(pattern)) for pattern in WEIGHT_FILES)


def _model_config(section: ModelSection):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            section.path, local_files_only=True, trust_remote_code=section.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"model.path: cannot read the config of {section.path!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        ) from None


def model_type(section: ModelSection) -> str:
    """The config's model_type ("qwen2"), read before any weight is loaded."""
    return _model_config(section).model_type


def check_sequence_lengths(section: ModelSection, lengths: dict[str, int]) -> None:
    """Refuse sequence lengths past the model's position limit before anything heavy is loaded.

    Learned position tables (GPT-NeoX, GPT-2) would fail with an index error deep in the forward, and
    rotary models were not trained past the limit; a model that was extended sets the larger limit in
    its config.json.
    """
    config = _model_config(section)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_LIMIT_KEYS:
        limit = getattr(text_config, key, None)
        if isinstance(limit, int) and limit > 0:
            break
    else:
        return
    for knob, length in lengths.items():
        if length > limit:
            raise ConfigError(
                f"{knob}={length} exceeds the model's {key}={limit} ({section.path}); set {knob} <= {limit}"
            )


def check_vocabulary(section: ModelSection, tokenizer) -> None:
    """Refuse a tokenizer that does not belong to the model before any weight is loaded: ids past the
    embedding table fail with an IndexError deep in the forward, and another model's tokenizer of a fitting
    size trains silently on ids that mean other tokens (its end-of-sequence id gives it away)."""
    config = _model_config(section)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    where = f"model.tokenizer: {section.tokenizer or section.path}"
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{where} has {len(tokenizer)} tokens, the model ({section.path}) embeds {vocab_size}; "
            "use the model's own tokenizer"
        )
    model_eos = getattr(text_config, "eos_token_id", None)
    model_eos = set(model_eos) if isinstance(model_eos, list) else {model_eos} - {None}
    if model_eos and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in model_eos:
        raise ConfigError(
            f"{where} ends sequences with id {tokenizer.eos_token_id}, the model ({section.path}) "
            f"with {sorted(model_eos)}; use the model's own tokenizer"
        )


def fingerprint(section: ModelSection) -> dict:
    """What identifies the base model cheaply: its config and the names and sizes of its weight files.

    (Hashing the weights would read hundreds of GB for a large model; a changed file size or config is
    what a different or re-converted model shows.)
    """
    config = json.loads(_model_config(section).to_json_string(use_diff=False))
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(volatile, None)
    files = sorted((f.name, f.stat().st_size) for pattern in WEIGHT_FILES for f in Path(section.path).glob(pattern))
    return {"config": config, "weight_files": [list(f) for f in files], "random_init": not files}


def fingerprint_digest(model_fingerprint: dict) -> str:
    """A short hash of a `fingerprint`: what probe.json records so that another model refuses it."""
    blob = json.dumps(model_fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_safetensors_shards(model_dir: str | Path, knob: str = "model.path") -> None:
    """Every shard the index names (or the one model.safetensors) is present and whole (its header's tensors
    end within the file).

    A shard cut short by an interrupted copy otherwise fails deep inside from_pretrained, on one rank, with a
    message about the safetensors header or an out-of-range read, possibly after minutes of loading.
    """
    import struct

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{knob}: {index} is unreadable ({type(err).__name__}: {err})") from None
    else:
        files = sorted(f.name for f in model_dir.glob("*.safetensors"))
    for name in files:
        shard = model_dir / name
        if not shard.is_file():
            raise ConfigError(f"{knob}: {shard} is missing (named in {index.name}); copy the whole checkpoint")
        size = shard.stat().st_size
        try:
            with shard.open("rb") as handle:
                header_bytes = struct.unpack("<Q", handle.read(8))[0]
                if 8 + header_bytes > size:
                    raise ValueError("header past the end of the file")
                header = json.loads(handle.read(header_bytes))
            data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{knob}: {shard} is not a readable safetensors file ({err}); copy it again") from None
        if 8 + header_bytes + data_end > size:
            raise ConfigError(
                f"{knob}: {shard} is truncated ({size} bytes, its header needs "
                f"{8 + header_bytes + data_end}); copy it again"
            )


def shard_groups(model: nn.Module, weight_map: dict[str, str]) -> list[list[str]]:
    """The checkpoint's shard files in the groups they are loaded in, one group at a time: a parameter built from
    tensors of several shards (a fused MoE expert bank whose experts straddle a shard boundary) needs them in
    one state dict, where transformers' weight conversion fuses them; every other shard is a group of its own.

    `weight_map` is {tensor name on disk: shard file}; the names on disk of each parameter come from
    transformers' own revert_weight_conversion, as the merge and the checkpoint writer find them.
    """
    from transformers.core_model_loading import revert_weight_conversion

    leader = {file: file for file in weight_map.values()}

    def root(file: str) -> str:
        while leader[file] != file:
            file = leader[file]
        return file

    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition keeps the full shape aside
        on_disk = revert_weight_conversion(model, {name: torch.empty(shape, device="meta")})
        roots = sorted({root(weight_map[key]) for key in on_disk if key in weight_map})
        for other in roots[1:]:
            leader[other] = roots[0]
    groups: dict[str, list[str]] = {}
    for file in sorted(leader):
        groups.setdefault(root(file), []).append(file)
    return sorted(groups.values())


def tie_before_copy(model: nn.Module, weight_map: dict[str, str]) -> list[str]:
    """Tie now, before any weight is copied in, each tied parameter the checkpoint stores only as its source
    (a tied head, stored once as the embedding); returns the names tied.

    transformers builds the model with ties undone and ties them after the copy (modeling_utils
    `_finalize_model_loading`, the same rule: target absent from the checkpoint, source present). Under ZeRO-3
    the untied head is a partition of its own until then: 1/world_size of an embedding more on every rank for
    the whole load. A target stored in the checkpoint (under any of its on-disk names) is left to transformers.
    """
    from transformers.core_model_loading import revert_weight_conversion

    def on_disk(name: str) -> list[str]:
        param = model.get_parameter(name)
        shape = getattr(param, "ds_shape", param.shape)
        return list(revert_weight_conversion(model, {name: torch.empty(shape, device="meta")}))

    tied = []
    for target, source in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
        source_keys = on_disk(source)
        if any(key in weight_map for key in on_disk(target)) or not source_keys:
            continue
        if not all(key in weight_map for key in source_keys):
            continue
        parent, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, model.get_parameter(source))
        tied.append(target)
    if tied:
        # DeepSpeed's per-parameter closures put a dropped partitioned parameter in a reference cycle: without a
        # collection its partition stays allocated until the collector happens to run (measured on GPUs)
        gc.collect()
    return tied


def load_model(
    section: ModelSection, dtype: torch.dtype, device: torch.device, init_context, seed: int = 0, zero3: bool = False
) -> nn.Module:
    """Local weights only (no hub); `model.random_init` allows a config-only directory (seeded weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"trust_remote_code": section.trust_remote_code}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    weights = has_weights(section.path)
    if not weights and not section.random_init:
        raise ConfigError(
            f"model.path: {section.path!r} has config.json but no weights "
            "(*.safetensors/*.bin); set model.random_init=true to train from random weights"
        )
    if any(Path(section.path).glob("*.bin")) and not any(Path(section.path).glob("*.safetensors")):
        # pickled checkpoints run code on load; transformers refuses them with torch < 2.6 anyway
        kwargs["use_safetensors"] = False
    if weights:
        check_safetensors_shards(section.path)
    with init_context():
        try:
            if weights:
                model = AutoModelForCausalLM.from_pretrained(section.path, dtype=dtype, local_files_only=True, **kwargs)
            else:
                config = AutoConfig.from_pretrained(
                    section.path, local_files_only=True, trust_remote_code=section.trust_remote_code
                )
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"model.path: cannot load {section.path!r} ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
    model.requires_grad_(False)
    model.config.use_cache = False
    if not zero3:
        model.to(device)
    return model
