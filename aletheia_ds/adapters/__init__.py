"""LoRA adapters from a Plan: peft_config (Plan -> LoraConfig, plan.json), attach (attach + verify), experts
(per-expert LoRA of megablocks banks), export (the adapter files, PEFT format)."""
