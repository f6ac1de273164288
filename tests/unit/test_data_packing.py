"""Packed rows keep examples apart: a packed batch gives every example the loss it has unpacked (tiny model, fp32),
for sdpa and eager (transformers' block-diagonal masks from position ids) and for the flattened single row that
flash attention's variable-length kernels read."""

import random

import pytest
import torch
from helpers.families import tiny_model

from aletheia_ds.config import ConfigError
from aletheia_ds.data import IGNORE, Example, check_packing, collate, model_inputs, pack

PAD = 0


def _examples(count: int = 9, seed: int = 5) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n, prompt = rng.randint(4, 20), rng.randint(0, 3)
        ids = [rng.randint(3, 95) for _ in range(n)]
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _token_losses(model, inputs: dict) -> torch.Tensor:
    """Cross-entropy of every position's next-token prediction, 0 where the label is IGNORE (shape of labels)."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits.float()
    labels = inputs["labels"]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )
    return torch.nn.functional.pad(losses, (1, 0))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flattened"])
def test_packed_batch_gives_each_example_its_unpacked_loss(family, attention):
    examples = _examples()
    implementation = "sdpa" if attention == "flattened" else attention
    model = tiny_model(family, attn_implementation=implementation)
    with torch.no_grad():
        unpacked = [
            float(_token_losses(model, collate([ex], PAD))[0].sum()) / sum(label != IGNORE for label in ex.labels[1:])
            for ex in examples
        ]
        rows = pack(examples, 48)
        assert len(rows) < len(examples)  # several examples share rows
        batch = collate(rows[:], PAD)
        # "flattened": the single row handed to flash attention, read here by sdpa's own packed-sequence masks
        inputs = model_inputs(batch, "flash_attention_2" if attention == "flattened" else implementation)
        assert "attention_mask" not in inputs
        losses = _token_losses(model, inputs)
        if attention == "flattened":
            assert inputs["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
            widths = batch["attention_mask"].sum(dim=1).tolist()
            losses = list(losses[0].split(widths))  # back to one tensor per packed row
        packed = []
        for row in range(len(rows)):
            offset = 0
            for index in range(rows.starts[row], rows.starts[row + 1]):
                ex = examples[index]
                n = len(ex.input_ids)
                packed.append(
                    float(losses[row][offset : offset + n].sum()) / sum(label != IGNORE for label in ex.labels[1:])
                )
                offset += n
    assert packed == pytest.approx(unpacked, rel=1e-5, abs=1e-5)


def test_whole_batch_loss_of_packed_rows_equals_the_unpacked_mean():
    """The loss the training step backpropagates (transformers' mean over label tokens) is unchanged by packing."""
    examples = _examples(seed=11)
    model = tiny_model("llama", attn_implementation="sdpa")
    with torch.no_grad():
        unpacked = model(**collate(examples, PAD), use_cache=False).loss
        packed = model(**model_inputs(collate(pack(examples, 40)[:], PAD), "sdpa"), use_cache=False).loss
    assert float(packed) == pytest.approx(float(unpacked), rel=1e-5)


def test_unpacked_batches_pass_through_and_unknown_attention_is_refused():
    batch = collate(_examples(count=2), PAD)
    assert model_inputs(batch, "flash_attention_2") is batch
    check_packing("sdpa")
    check_packing("flash_attention_2")
    with pytest.raises(ConfigError, match="data.packing: attention implementation 'my_kernel'"):
        check_packing("my_kernel")
