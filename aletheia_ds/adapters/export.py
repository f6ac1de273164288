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

from ..config import ConfigError
from ..io import atomic_dir
from .attach import INITIAL_FACTORS
from .experts import CONFIG_FILE, FORMAT, WEIGHTS_FILE, expert_loras
from .serving import write_serving_facts


def check_adapter_fits(model: nn.Module, adapter: str | Path) -> None:
    """Refuse, before PEFT loads it, an adapter trained on another model: every LoRA factor in
    adapter_model.safetensors (PEFT's names: base_model.model.<module>.lora_A/B.weight, A of shape (r, in),
    B of shape (out, r)) must fit that module of `model` (a meta-device skeleton will do). PEFT would print one
    size-mismatch line per tensor instead."""
    from safetensors import safe_open

    file = Path(adapter) / "adapter_model.safetensors"
    if not file.is_file():
        return
    with safe_open(str(file), "pt") as handle:
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    modules = dict(model.named_modules())
    misfits = []
    for key, shape in sorted(shapes.items()):
        name, part = key.removeprefix("base_model.model.").rpartition(".lora_")[::2]
        weight = getattr(modules.get(name), "weight", None)
        if part not in ("A.weight", "B.weight") or weight is None or weight.ndim != 2 or len(shape) != 2:
            continue  # names PEFT maps itself (embeddings, converted checkpoints) are left to PEFT
        out_features, in_features = getattr(weight, "ds_shape", weight.shape)
        if (shape[1] if part[0] == "A" else shape[0]) != (in_features if part[0] == "A" else out_features):
            misfits.append(f"{name}.lora_{part[0]} {shape} for a {in_features} -> {out_features} linear")
    if misfits:
        raise ConfigError(
            f"--adapter: {adapter} was trained on another model: {len(misfits)} LoRA tensors do not "
            f"fit (first: {misfits[0]}); use the base model it was trained on"
        )


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
    initial = getattr(peft_model, INITIAL_FACTORS, None)
    with atomic_dir(out_dir) as tmp:
        if initial is None:
            peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        else:
            save_converted_adapter(peft_model, state, initial, tmp)
        save_expert_adapter(peft_model, tmp, state)  # per-expert LoRA of megablocks banks, beside PEFT's files
        write_serving_facts(tmp)  # max rank and targets, for vLLM's --max-lora-rank
    return Path(out_dir)


def save_converted_adapter(
    peft_model: nn.Module, state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], directory: Path
) -> None:
    """A PiSSA/OLoRA adapter, trained on the rewritten base W - s B0 A0, written as a plain LoRA of rank 2r on the
    original base ([A; A0], [B, -B0]) by PEFT's own conversion: save_pretrained with
    path_initial_model_for_weight_conversion, which loads the starting factors as a second adapter into the model
    it saves from. That model is a weightless copy of this one's structure (meta device), so the training model is
    never changed on this rank while the others run on, and no collective runs; `state` (the trained factors) and
    `initial` (keep_initial_factors) supply every value."""
    import copy
    import tempfile

    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    base = peft_model.get_base_model()
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.init_lora_weights = True  # the copy needs no base weights; its factors are never read
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the training RNG stays where it was
        # the class itself, not from_config: transformers would build under zero.Init, a collective
        shadow = get_peft_model(type(base)(copy.deepcopy(base.config)), config, low_cpu_mem_usage=True)
    with tempfile.TemporaryDirectory(dir=Path(directory).parent) as scratch:
        start = Path(scratch) / "initial"  # PEFT names the loaded starting adapter after its folder
        start.mkdir()
        save_file(get_peft_model_state_dict(peft_model, state_dict=initial), str(start / "adapter_model.safetensors"))
        # PEFT reads both adapters from the one state_dict it is given: the trained one by the PeftModel's names,
        # the starting one by the names inside it (LoraModel.subtract_mutated_init, no "base_model." prefix)
        starting = {
            name.removeprefix("base_model.").replace(".default.", ".initial."): t for name, t in initial.items()
        }
        both = {**state, **starting}
        with torch.random.fork_rng(devices=[]):
            shadow.save_pretrained(
                str(directory),
                state_dict=both,
                safe_serialization=True,
                path_initial_model_for_weight_conversion=str(start),
            )


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
