"""aletheia_ds: gradient-guided layer selection for LoRA fine-tuning on DeepSpeed."""

__version__ = "0.1.0"
