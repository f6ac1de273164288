"""Adapter export: the trained LoRA weights gathered from every rank and written as a PEFT adapter directory.

This writes the adapter only (load it with peft.PeftModel.from_pretrained on the base model); folding it into
the base weights is aletheia_ds/merge.py. The same writer serves the final adapter/ and every checkpoint's
adapter/, so a resumed run can compare the two bit for bit.

Megablocks banks carry this package's own per-expert LoRA (aletheia_ds/adapters/experts.py); it is written
beside PEFT's files as expert_adapter.{json,safetensors}, which `load_expert_adapter` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..io import atomic_dir
from .experts import CONFIG_FILE, FORMAT, WEIGHTS_FILE, expert_loras
from .serving import write_serving_facts


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
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        save_expert_adapter(peft_model, tmp, state)  # per-expert LoRA of megablocks banks, beside PEFT's files
        write_serving_facts(tmp)  # max rank and targets, for vLLM's --max-lora-rank
    return Path(out_dir)


def save_expert_adapter(model: nn.Module, directory: str | Path, state: dict[str, torch.Tensor]) -> bool:
    """Write expert_adapter.{json,safetensors} from gathered `state` (named as model.named_parameters()).

    Returns False (writing nothing) when the model has no per-expert LoRA.
    """
    from safetensors.torch import save_file

    loras = expert_loras(model)
    if not loras:
        return False
    by_module = {id(lora): name for name, lora in loras.items()}
    tensors = {}
    for full_name, module in model.named_modules():
        if id(module) in by_module:
            parameter = by_module[id(module)]
            for part in ("lora_A", "lora_B"):
                tensors[f"{parameter}.{part}"] = state[f"{full_name}.{part}"].detach().cpu().contiguous()
    blob = {"format": FORMAT, "version": 1, "banks": [lora.describe(name) for name, lora in sorted(loras.items())]}
    directory = Path(directory)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(blob, indent=2) + "\n", encoding="utf-8")
    return True
