"""Build the frozen base model from a local directory (under zero.Init when ZeRO-3 is on)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, ModelSection

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def has_weights(path: str | Path) -> bool:
    return any(any(Path(path).glob(pattern)) for pattern in WEIGHT_FILES)


def load_model(section: ModelSection, dtype: torch.dtype, device: torch.device, init_context, seed: int = 0,
               zero3: bool = False) -> nn.Module:
    """Local weights only (no hub); `model.random_init` allows a config-only directory (seeded weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"trust_remote_code": section.trust_remote_code}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    weights = has_weights(section.path)
    if not weights and not section.random_init:
        raise ConfigError(f"model.path: {section.path!r} has config.json but no weights "
                          "(*.safetensors/*.bin); set model.random_init=true to train from random weights")
    if any(Path(section.path).glob("*.bin")) and not any(Path(section.path).glob("*.safetensors")):
        # pickled checkpoints run code on load; transformers refuses them with torch < 2.6 anyway
        kwargs["use_safetensors"] = False
    with init_context():
        try:
            if weights:
                model = AutoModelForCausalLM.from_pretrained(section.path, dtype=dtype, local_files_only=True, **kwargs)
            else:
                config = AutoConfig.from_pretrained(section.path, local_files_only=True,
                                                    trust_remote_code=section.trust_remote_code)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"model.path: cannot load {section.path!r} "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    model.requires_grad_(False)
    model.config.use_cache = False
    if not zero3:
        model.to(device)
    return model
