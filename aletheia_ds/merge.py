"""Merge an adapter into its base model and write a plain transformers model (safetensors) for serving.

    aletheia-ds export --model DIR --adapter RUN/adapter --out merged/ --merge

This is the export of a merged model; the adapter directory it reads is the adapter export of a training run
(aletheia_ds/adapters/export.py).

The base is loaded in float32, the adapter with plain PEFT, `merge_and_unload` folds every LoRA delta into
its weight (linears and, through PEFT's parameter wrappers, fused expert banks), and the result is cast to
`dtype` and saved with `save_pretrained` (safetensors), with the tokenizer when one is found. Everything is
written to a temporary directory beside `out` and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, ModelSection
from .io import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if (Path(adapter) / "expert_adapter.json").is_file():
        raise ConfigError(f"--adapter: {adapter!r} holds per-expert LoRA of megablocks banks "
                          "(expert_adapter.safetensors), which cannot be merged into a transformers checkpoint; serve "
                          "the base model with the adapter loaded (aletheia_ds.adapters.experts.load_expert_adapter)")
    target = Path(out).resolve()
    if target in (Path(model).resolve(), Path(adapter).resolve()):
        raise ConfigError(f"--out: {out!r} is the model or adapter directory; choose a new directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"--out: {out!r} exists and is not empty; choose a new directory or pass --overwrite")


def export_merged(model: str, adapter: str, out: str, tokenizer: Optional[str] = None, dtype: str = "auto",
                  overwrite: bool = False) -> Path:
    """base + adapter -> one merged model directory (config.json, model*.safetensors, tokenizer files)."""
    from peft import PeftModel

    from .model import load_model

    check_export_args(model, adapter, out, overwrite)
    dtype = checkpoint_dtype(model) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    base = load_model(ModelSection(path=model, dtype="float32"), torch.float32, torch.device("cpu"),
                      contextlib.nullcontext)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.config.use_cache = True  # training turned the KV cache off; serving wants it
    merged.to(DTYPES[dtype])
    with atomic_dir(out) as tmp:  # an existing (empty, or --overwrite) directory is replaced whole
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer or any((Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            from .data import load_tokenizer

            load_tokenizer(tokenizer or model).save_pretrained(str(tmp))
    return Path(out)
