"""TRL's own DPO and SimPO computations on a batch collated by aletheia_ds.data: the reference that
aletheia_ds.objectives is tested against (unit tests in one process; the ZeRO-3 test compares its ranks' numbers
with these computed here).

DPO: DPOTrainer.compute_loss, adapters disabled for the reference. SimPO: the experimental CPOTrainer
(loss_type="simpo"), get_batch_loss_metrics. Both get the already-adapted PeftModel; each trainer is built on a
one-row dataset only because its constructor needs one (the compared batch is passed to the loss directly).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from helpers.ranks import tiny_causal_lm

TOKENIZER = Path(__file__).resolve().parents[2] / "examples/tiny/tokenizer"
PREFERENCES = Path(__file__).resolve().parents[2] / "examples/tiny/prefs_train.jsonl"


def tokenizer():
    from aletheia_ds.data import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


def preference_batch(tok, first: int, pairs: int, seq_len: int = 48) -> dict:
    """`pairs` rows of the shipped preference data from row `first`, collated (2 x pairs rows)."""
    from aletheia_ds.data import collate, load_examples

    examples = load_examples(PREFERENCES, tok, seq_len, max_examples=first + pairs, log=lambda _m: None)
    return collate(examples[first:], tok.pad_token_id)


def tiny_lm(vocab_size: int, layers: int = 4, seed: int = 0):
    model = tiny_causal_lm(seed, layers, vocab_size=vocab_size)
    model.requires_grad_(False)
    return model.eval()


def cut_plan(model, lowest: int):
    """(layout, plan) adapting the layers from `lowest` up; the ones below form the frozen prefix."""
    from aletheia_ds.arch import describe
    from aletheia_ds.config import PlanSection
    from aletheia_ds.plan import make_plan
    from helpers.reports import fake_report

    layout = describe(model)
    scores = [0.1 if i < lowest else 5.0 + i for i in range(layout.num_layers)]
    top = 100.0 * (layout.num_layers - lowest) / layout.num_layers
    plan = make_plan(fake_report(layout, scores), PlanSection(top_pct=top, attention_r=4, mlp_r=8))
    assert plan.lowest_adapted_layer == lowest
    return layout, plan


def set_adapter_weights(peft_model, seed: int = 7, scale: float = 0.05) -> None:
    """Seeded non-zero LoRA factors (PEFT starts B at zero, where policy = reference and DPO is trivial);
    the same values for the same parameter names on any model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def lora_grads(peft_model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in peft_model.named_parameters() if p.grad is not None}


def _dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "Question: 1 + 1?\nAnswer:", "chosen": " 2.", "rejected": " 3."}])


def trl_dpo(peft_model, tok, batch: dict, beta: float, out_dir: Path) -> dict:
    """TRL's DPO loss, reward means and LoRA gradients for `batch` (2B rows: chosen then rejected)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out_dir), report_to=[], use_cpu=True, beta=beta, bf16=False, loss_type=["sigmoid"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=peft_model, args=args, train_dataset=_dataset(), processing_class=tok)
    # TRL copies an adapter it is handed into a frozen "ref" adapter; without it TRL's reference is the base
    # with the adapters disabled, which is the reference aletheia_ds uses
    peft_model.delete_adapter("ref")
    peft_model.set_adapter("default")
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return {
        "loss": float(loss.detach()),
        "reward_chosen": metrics["rewards/chosen"],
        "reward_rejected": metrics["rewards/rejected"],
        "reward_margin": metrics["rewards/margins"],
        "reward_accuracy": metrics["rewards/accuracies"],
        "grads": lora_grads(peft_model),
    }


def trl_simpo(peft_model, tok, batch: dict, beta: float, simpo_gamma: float, cpo_alpha: float, out_dir: Path) -> dict:
    """TRL's SimPO (CPOTrainer, loss_type="simpo") loss, reward means and LoRA gradients for `batch`."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        output_dir=str(out_dir),
        report_to=[],
        use_cpu=True,
        bf16=False,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=simpo_gamma,
        cpo_alpha=cpo_alpha,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(model=peft_model, args=args, train_dataset=_dataset(), processing_class=tok)
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    pairs = batch["input_ids"].shape[0] // 2
    inputs = {}
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        inputs[f"{side}_input_ids"] = batch["input_ids"][rows]
        inputs[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        inputs[f"{side}_labels"] = batch["labels"][rows]
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, inputs)
    loss.backward()
    return {
        "loss": float(loss.detach()),
        "reward_chosen": metrics["rewards/chosen"],
        "reward_rejected": metrics["rewards/rejected"],
        "reward_margin": metrics["rewards/margins"],
        "reward_accuracy": metrics["rewards/accuracies"],
        "grads": lora_grads(peft_model),
    }
