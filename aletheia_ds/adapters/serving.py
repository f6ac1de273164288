"""What a serving stack needs to load an adapter folder, written beside it as serving.json.

vLLM sizes its LoRA buffers by `--max-lora-rank`, which must be at least the highest rank of any adapted
module (rank_pattern and per-expert ranks included); a rank above it is refused at load time, after the
model is up. The file states that rank, the modules and parameters adapted, and the megablocks expert banks:

    {"max_lora_rank": 16, "target_modules": [...], "target_parameters": [...], "expert_banks": [...],
     "vllm": "vllm serve BASE_MODEL_DIR --enable-lora --max-lora-rank 16 --lora-modules adapter=ADAPTER_DIR"}
"""

from __future__ import annotations

import json
from pathlib import Path

SERVING_FILE = "serving.json"
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def serving_facts(adapter_dir: str | Path) -> dict:
    """Read from adapter_config.json (and expert_adapter.json when present) alone."""
    from .experts import CONFIG_FILE as EXPERT_CONFIG

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    banks = []
    if (adapter_dir / EXPERT_CONFIG).is_file():
        banks = json.loads((adapter_dir / EXPERT_CONFIG).read_text(encoding="utf-8"))["banks"]
        ranks += [int(bank["r"]) for bank in banks]
    highest = max(ranks)
    serve_rank = next((r for r in VLLM_RANKS if r >= highest), highest)
    facts = {
        "max_lora_rank": highest,
        "target_modules": sorted(config.get("target_modules") or []),
        "target_parameters": sorted(config.get("target_parameters") or []),
        "expert_banks": [{k: bank[k] for k in ("parameter", "num_experts", "experts", "r")} for bank in banks],
        "vllm": f"vllm serve BASE_MODEL_DIR --enable-lora --max-lora-rank {serve_rank} "
        "--lora-modules adapter=ADAPTER_DIR",
    }
    if config.get("use_dora"):
        # vLLM's adapter loader refuses use_dora ("vLLM does not yet support DoRA", vllm/lora/peft_helper.py)
        facts["vllm"] = "vllm serve MERGED_DIR  (DoRA adapters are served merged: aletheia-ds export --merge)"
    return facts


def write_serving_facts(adapter_dir: str | Path) -> None:
    (Path(adapter_dir) / SERVING_FILE).write_text(
        json.dumps(serving_facts(adapter_dir), indent=2) + "\n", encoding="utf-8"
    )
