"""LoRA adapters from a Plan: PEFT config, attach + verify, per-expert LoRA, export."""
