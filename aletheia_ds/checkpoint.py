"""Adapter export (PEFT format) and JSON artefacts, written atomically: temp path, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def _umask_mode(directory: bool) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_json_atomic(path: str | Path, blob: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(blob, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode(False))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an existing one is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if "lora_" in name]


def export_adapter(ctx, peft_model: nn.Module, out_dir: str | Path) -> Path | None:
    """Gather the LoRA weights (every rank takes part under ZeRO-3), write them from rank 0 in PEFT format."""
    params = lora_parameters(peft_model)
    state = {}
    with ctx.gathered([p for _, p in params]):
        if ctx.is_main:
            state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params}
    if not ctx.is_main:
        return None
    empty = [name for name, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter export: {len(empty)} LoRA tensors are empty after gathering (first: {empty[0]})")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        from .expert_lora import save_expert_adapter

        save_expert_adapter(peft_model, tmp, state)  # per-expert LoRA of megablocks banks, beside PEFT's files
        os.chmod(tmp, _umask_mode(True))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, _umask_mode(False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
